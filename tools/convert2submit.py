"""Write the submission CSV from a test file and a prediction file, pairing them by id:
python -m tools.convert2submit --test_file T --prediction_file P --save_path S.csv [--columns all|id,predict] [--fill]
    [--by_position] [--kind auto|train|test]

Answers are read by mire_factory/answers.py: CoT JSON parsed, near misses fixed to their label; empty or unmatched
answers are written as they are (the official metric scores them as wrong), unless --fill gives them the nearest
label. Missing ids are an error unless --fill."""

from __future__ import annotations

from dataclasses import dataclass, field

from mire_factory.evaluate import write_submission
from mire_factory.hparams import config_field, parse_args
from mire_factory.io import run_cli
from mire_factory.records import KINDS


@dataclass(kw_only=True)
class SubmitArguments:
    test_file: str = field(metadata={"help": "MIRE test json (labels not needed)"})
    prediction_file: str = field(metadata={"help": "generated_predictions.jsonl (by position) or ours (by id)"})
    save_path: str = field(metadata={"help": "the CSV to write (utf-8-sig, as the official tool)"})
    columns: str = field(default="all", metadata={
        "help": "all test fields + predict (the official layout), or only id,predict", "choices": ["all", "id,predict"]})
    fill: bool = field(default=False, metadata={
        "help": "give every record a label: invalid answers the nearest label, missing or failed predictions the "
                "task's default (and report them)"})
    by_position: bool = field(default=False, metadata={
        "help": "pair predictions without ids with the test records by position (same count and order)"})
    kind: str = field(default="auto", metadata={"help": "the test file's kind (labels are not needed)",
                                                "choices": list(KINDS)})
    config: str | None = config_field()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(SubmitArguments, argv, __doc__)
    for line in write_submission(args.test_file, args.prediction_file, args.save_path, columns=args.columns,
                                 fill=args.fill, by_position=args.by_position, kind=args.kind):
        print(line)
    return 0

if __name__ == "__main__":
    run_cli(main)
