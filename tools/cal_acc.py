"""Score predictions with the official MIRE metric, per task and per class:
python -m tools.cal_acc --test_file T --prediction_file P [--json_file M.json] [--plot_dir D] [--fill] [--raw]
    [--by_position]

Answers are read by mire_factory/answers.py: CoT JSON parsed, near misses fixed, empty or unmatched answers scored as
invalid (as the official tool scores them); --fill gives every record a label instead (the nearest, or the task's
default)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mire_factory.evaluate import evaluate, write_evaluation
from mire_factory.hparams import config_field, parse_args
from mire_factory.io import run_cli


@dataclass(kw_only=True)
class CalAccArguments:
    test_file: str = field(metadata={"help": "MIRE json with gold labels (`output`)"})
    prediction_file: str = field(metadata={"help": "generated_predictions.jsonl (by position) or ours (by id)"})
    json_file: str | None = field(default=None, metadata={
        "help": "write overall/image/dialogue/pooled/per_class scores here"})
    plot_dir: str | None = field(default=None, metadata={"help": "write confusion_<task>.png (and .csv) here"})
    raw: bool = field(default=False, metadata={
        "help": "score the strings as written, no CoT parsing or label fixing"})
    fill: bool = field(default=False, metadata={
        "help": "give every record a label: invalid answers the nearest label, missing or failed predictions the "
                "task's default (default: they score as invalid; missing ids are an error)"})
    by_position: bool = field(default=False, metadata={
        "help": "pair predictions without ids with the test records by position (same count and order)"})
    config: str | None = config_field()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(CalAccArguments, argv, __doc__)
    evaluation = evaluate(args.test_file, args.prediction_file, fill=args.fill, by_position=args.by_position,
                          raw=args.raw)
    print(evaluation.text())
    for path in write_evaluation(evaluation, args.json_file, args.plot_dir):
        print(f"wrote {path}")
    return 0

if __name__ == "__main__":
    run_cli(main)
