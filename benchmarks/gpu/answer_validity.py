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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prediction_file", required=True)
    parser.add_argument("--answer_format", choices=["label", "cot"], required=True)
    parser.add_argument("--json_out")
    args = parser.parse_args()
    rows = [json.loads(line) for line in Path(args.prediction_file).read_text(encoding="utf-8").splitlines() if line]
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
                          for t in ("image", "dialogue")},
              "invalid_examples": bad}
    print(json.dumps(result, ensure_ascii=False))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return 0 if result["valid"] == result["predictions"] else 1


if __name__ == "__main__":
    sys.exit(main())
