"""Score predictions with the official MIRE metric, per task and per class:
python -m tools.cal_acc --test_file T --prediction_file P [--json_file M.json] [--plot_dir D] [--raw]"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mire_factory.io import OutputSet, run_cli
from mire_factory.predictions import load_labels
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
    parser.add_argument("--fill", action="store_true", help="score missing predictions as the task's default label")
    args = parser.parse_args(argv)

    records = load_records(args.test_file, None, kind="train")
    preds, report, _ = load_labels(records, args.prediction_file, fill=args.fill, raw=args.raw)
    golds = [r.output for r in records]
    tasks = [r.task for r in records]
    result = score(golds, preds, tasks)

    print(json.dumps(result["overall"]))  # the official tool's one line
    lines = report.lines()
    print("\n".join(lines) if not args.raw else "scored the raw strings (no CoT parsing, no label fixing)")
    if args.raw and report.filled:
        print("\n".join(line for line in lines if "filled ->" in line))
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
