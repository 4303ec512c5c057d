"""Write the submission CSV from a test file and a prediction file, pairing them by id:
python -m tools.convert2submit --test_file T --prediction_file P --save_path S.csv [--columns all|id,predict] [--fill]
    [--by_position] [--kind auto|train|test]

Answers are read by mire_factory/answers.py: CoT JSON parsed, near misses fixed to their label; empty or unmatched
answers are written as they are (the official metric scores them as wrong), unless --fill gives them the nearest
label. Missing ids are an error unless --fill."""

from __future__ import annotations

import argparse
from collections import Counter

import pandas as pd

from mire_factory.io import atomic_path, read_json, run_cli
from mire_factory.predictions import load_answers
from mire_factory.records import KINDS, load_records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test_file", required=True, help="MIRE test json (labels not needed)")
    parser.add_argument("--prediction_file", required=True, help="generated_predictions.jsonl (by position) or ours (by id)")
    parser.add_argument("--save_path", required=True, help="the CSV to write (utf-8-sig, as the official tool)")
    parser.add_argument("--columns", choices=["all", "id,predict"], default="all",
                        help="all test fields + predict (the official layout), or only id,predict")
    parser.add_argument("--fill", action="store_true",
                        help="give every record a label: invalid answers the nearest label, missing or failed "
                             "predictions the task's default (and report them)")
    parser.add_argument("--by_position", action="store_true",
                        help="pair predictions without ids with the test records by position (same count and order)")
    parser.add_argument("--kind", choices=KINDS, default="auto", help="the test file's kind (labels are not needed)")
    args = parser.parse_args(argv)

    records = load_records(args.test_file, None, kind=args.kind)
    raw = read_json(args.test_file)
    answers, report, alignment = load_answers(records, args.prediction_file, fill=args.fill,
                                              by_position=args.by_position)
    labels = [a.label if a.label is not None else a.text for a in answers]
    if not alignment.by_id:
        print(f"paired {len(records)} predictions with the test records by position (--by_position)")
    for line in report.lines():
        print(line)
    if alignment.missing:
        print(f"filled {len(alignment.missing)} missing predictions: {alignment.missing[:10]}")
    if alignment.duplicates:
        print(f"kept the first of duplicated predictions for {len(alignment.duplicates)} ids: {alignment.duplicates[:10]}")
    by_id = dict(zip((r.id for r in records), labels, strict=True))
    rows = []
    for example in raw:
        rows.append({**example, "predict": by_id[example["id"]]} if args.columns == "all"
                    else {"id": example["id"], "predict": by_id[example["id"]]})
    with atomic_path(args.save_path) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False, encoding="utf-8-sig")
    per_task = Counter(r.task for r in records)
    print(f"wrote {args.save_path}: {len(rows)} rows ({per_task.get('image', 0)} image, "
          f"{per_task.get('dialogue', 0)} dialogue), columns {list(rows[0])}")
    return 0


if __name__ == "__main__":
    run_cli(main)
