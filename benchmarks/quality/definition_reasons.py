"""Stand-in teacher reasons for the harness's second-turn measurement: no Qwen2-VL-72B is reachable from here, so each
train record gets a reason built from what a teacher told the gold label (tools.distill --mode 2) would draw on:
the label's official definition (mire_factory/taxonomy.py) and, for a dialogue, the customer's last words.

python benchmarks/quality/definition_reasons.py --train_file .gpu_data/quality/train.json --out reasons.jsonl

Writes tools.distill's reasons JSONL (mire_factory/reasons.py: mode 2, model "definitions", status ok, label = gold)
for tools.merge_cot --layout second_turn. What the measurement can show with them: whether a second exchange that
explains the label costs or helps the first turn's answer; not what a real teacher's reasons (which see the images)
would add.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mire_factory.io import run_cli, write_jsonl_atomic  # noqa: E402
from mire_factory.reasons import ReasonRecord  # noqa: E402
from mire_factory.records import load_records  # noqa: E402
from mire_factory.taxonomy import DEFINITIONS, USER_PREFIX  # noqa: E402

MODEL = "definitions"
QUOTE_CHARS = 40  # of the customer's last words: the reason stays well inside merge_cot's 100-token budget


def last_customer_words(instruction: str) -> str:
    """The customer's last line with text (image placeholders dropped), cut to QUOTE_CHARS."""
    for line in reversed(instruction.splitlines()):
        if line.startswith(USER_PREFIX):
            text = line[len(USER_PREFIX):].replace("<image>", "").strip()
            if text:
                return text[:QUOTE_CHARS]
    return ""


def reason_for(record) -> str:
    definition = DEFINITIONS[record.task][record.output]
    if record.task == "dialogue":
        said = last_customer_words(record.instruction)
        evidence = f"用户说“{said}”，" if said else "用户发来图片，"
        return f"{evidence}符合“{definition}”，所以是{record.output}。"
    return f"图片是{definition}，所以是{record.output}。"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train_file", type=Path, required=True, help="a labelled MIRE json")
    p.add_argument("--out", type=Path, required=True, help="the reasons JSONL to write")
    args = p.parse_args(argv)
    records = load_records(args.train_file, kind="train", decode_images=False)
    rows = [ReasonRecord(r.id, 2, MODEL, "ok", reason=reason_for(r), label=r.output, gold=r.output,
                         task=r.task) for r in records]
    write_jsonl_atomic(args.out, (vars(row) for row in rows))
    print(f"wrote {len(rows)} reasons to {args.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
