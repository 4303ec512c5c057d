"""The teacher data study: per-class errors, mode 2 vs 3, confusions, suspected label errors.

python -m tools.analyze --input_file train.json --reasons_file r1.jsonl [--reasons_file r2.jsonl ...] --output_dir O

Writes O/report.md (+ PNGs: a confusion matrix per task, reason lengths of mode 2 vs 3) and O/trainset_error.md
(samples the teacher disagrees with in every mode given, grouped by class, for a person to review), the same
suspects as a corrections file O/suspects.jsonl (status suspected) and O/review.html, a self-contained page where a
reviewer accepts or rejects each (thumbnails need --image_dir) and saves the corrections file for
`tools.convert --corrections_file`.
"""

from __future__ import annotations

import argparse

from mire_factory.analyze import write_report
from mire_factory.io import run_cli
from mire_factory.records import load_records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_file", required=True, help="the MIRE train json the reasons were made from")
    parser.add_argument("--image_dir", help="optional: check that the images exist and show them on review.html")
    parser.add_argument("--reasons_file", action="append", required=True, help="reasons JSONL (repeatable)")
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    records = load_records(args.input_file, args.image_dir, kind="train")
    paths = write_report(records, args.reasons_file, args.output_dir, args.image_dir)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
