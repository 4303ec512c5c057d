"""Score predictions with the official MIRE metric, per task and per class:
python -m tools.cal_acc --test_file T --prediction_file P [--json_file M.json] [--plot_dir D] [--fill] [--raw]
    [--by_position]

Answers are read by mire_factory/answers.py: CoT JSON parsed, near misses fixed, empty or unmatched answers scored as
invalid (as the official tool scores them); --fill gives every record a label instead (the nearest, or the task's
default)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mire_factory.io import OutputSet, run_cli
from mire_factory.predictions import load_answers, raw_texts
from mire_factory.records import load_records
from mire_factory.scoring import format_per_class_table, format_scores_table, plot_confusion, score
from mire_factory.taxonomy import TASKS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test_file", required=True, help="MIRE json with gold labels (`output`)")
    parser.add_argument("--prediction_file", required=True, help="generated_predictions.jsonl (by position) or ours (by id)")
    parser.add_argument("--json_file", help="write overall/image/dialogue/pooled/per_class scores here")
    parser.add_argument("--plot_dir", help="write confusion_<task>.png (and .csv) here")
    parser.add_argument("--raw", action="store_true", help="score the strings as written, no CoT parsing or label fixing")
    parser.add_argument("--fill", action="store_true",
                        help="give every record a label: invalid answers the nearest label, missing or failed "
                             "predictions the task's default (default: they score as invalid; missing ids are an error)")
    parser.add_argument("--by_position", action="store_true",
                        help="pair predictions without ids with the test records by position (same count and order)")
    args = parser.parse_args(argv)

    records = load_records(args.test_file, None, kind="train")
    answers, report, alignment = load_answers(records, args.prediction_file, fill=args.fill,
                                              by_position=args.by_position)
    if args.raw:
        preds, n_missing = raw_texts(records, alignment)
    else:
        preds = [a.scored for a in answers]
    golds = [r.output for r in records]
    tasks = [r.task for r in records]
    result = score(golds, preds, tasks)

    print(json.dumps(result["overall"]))  # the official tool's one line
    if not alignment.by_id:
        print(f"paired {len(records)} predictions with the test records by position (--by_position)")
    if args.raw:
        print("scored the raw strings (no CoT parsing, no label fixing)"
              + (f"; {n_missing} missing predictions scored as the task's default label" if n_missing else ""))
    else:
        print("\n".join(report.lines()))
    print(format_scores_table(result))
    print(format_per_class_table(result))
    with OutputSet() as outs:  # metrics and plots are replaced together, or none of them
        if args.json_file:
            outs.write_json(args.json_file, result)
        if args.plot_dir:
            for task in TASKS:
                idx = [i for i, t in enumerate(tasks) if t == task]
                if idx:
                    plot_confusion(task, [golds[i] for i in idx], [preds[i] for i in idx], Path(args.plot_dir), outs)
        for path in outs.commit():
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
