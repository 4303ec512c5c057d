"""How many predictions are a valid answer of their record's task: a bare label, or CoT JSON with a valid label.

python benchmarks/gpu/answer_validity.py --prediction_file P.jsonl --answer_format label|cot [--json_out F.json]

Strict: the label answer is exactly one of the task's labels; the CoT answer is a JSON object with exactly the keys
"理由" and "所属类别", the latter one of the task's labels (no repair, no nearest label).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mire_factory.answers import is_strict_answer  # noqa: E402
from mire_factory.io import MireInputError, read_numbered_jsonl, run_cli, write_text_atomic  # noqa: E402
from mire_factory.taxonomy import TASKS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prediction_file", required=True)
    parser.add_argument("--answer_format", choices=["label", "cot"], required=True)
    parser.add_argument("--json_out")
    args = parser.parse_args(argv)
    rows = []
    for lineno, row in read_numbered_jsonl(args.prediction_file):  # a broken line: one error naming file and line
        for field, ok in (("id", isinstance(row.get("id"), str)), ("task", row.get("task") in TASKS),
                          ("predict", isinstance(row.get("predict"), str))):
            if not ok:
                raise MireInputError(f"{args.prediction_file}: line {lineno} (id {row.get('id')!r}): field {field!r} "
                                     f"missing or not valid: {row.get(field)!r}")
        rows.append(row)
    counts: Counter = Counter()
    bad = []
    for row in rows:
        ok = is_strict_answer(row["predict"], row["task"], args.answer_format)
        counts[(row["task"], ok)] += 1
        if not ok and len(bad) < 5:
            bad.append({"id": row["id"], "task": row["task"], "predict": row["predict"][:200]})
    result = {"answer_format": args.answer_format, "predictions": len(rows),
              "valid": sum(n for (_, ok), n in counts.items() if ok),
              "by_task": {t: {"valid": counts[(t, True)], "of": counts[(t, True)] + counts[(t, False)]}
                          for t in TASKS},
              "invalid_examples": bad}
    print(json.dumps(result, ensure_ascii=False))
    if args.json_out:
        write_text_atomic(args.json_out, json.dumps(result, ensure_ascii=False, indent=1) + "\n")
    return 0 if result["valid"] == result["predictions"] else 1


if __name__ == "__main__":
    run_cli(main)
