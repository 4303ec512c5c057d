"""The teacher data study: per-class errors, mode 2 vs 3, confusions, suspected label errors.

python -m tools.analyze --input_file train.json --reasons_file r1.jsonl [--reasons_file r2.jsonl ...] --output_dir O

Writes O/report.md (+ PNGs: a confusion matrix per task, reason lengths of mode 2 vs 3) and O/trainset_error.md
(samples the teacher disagrees with in every mode given, grouped by class, for a person to review), the same
suspects as a corrections file O/suspects.jsonl (status suspected) and O/review.html, a self-contained page where a
reviewer accepts or rejects each (thumbnails need --image_dir) and saves the corrections file for
`tools.convert --corrections_file`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mire_factory.analyze import write_report
from mire_factory.hparams import config_field, parse_args
from mire_factory.io import run_cli
from mire_factory.records import load_records


@dataclass(kw_only=True)
class AnalyzeArguments:
    input_file: str = field(metadata={"help": "the MIRE train json the reasons were made from"})
    image_dir: str | None = field(default=None, metadata={"help": "optional: check that the images exist and show them on review.html"})
    reasons_file: list[str] = field(metadata={"help": "reasons JSONL of tools.distill (repeatable)",
                                              "action": "extend"})
    output_dir: str = field(metadata={"help": "where report.md, trainset_error.md and the plots go"})
    config: str | None = config_field()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(AnalyzeArguments, argv, __doc__)
    records = load_records(args.input_file, args.image_dir, kind="train")
    paths = write_report(records, args.reasons_file, args.output_dir, args.image_dir)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
