"""A prediction file scored against gold labels (tools.cal_acc) and written as the submission CSV
(tools.convert2submit): the tools' work as functions, which the demo calls too."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .io import OutputSet, atomic_path, read_json
from .predictions import load_answers, raw_texts
from .records import load_records
from .scoring import format_per_class_table, format_scores_table, plot_confusion, score
from .taxonomy import TASKS


@dataclass
class Evaluation:
    result: dict  # scoring.score's: overall, image, dialogue, pooled, per_class
    golds: list[str]
    preds: list[str]
    tasks: list[str]
    lines: list[str]  # what a person reads: how the answers were read, the scores' tables

    def text(self) -> str:
        return "\n".join(self.lines)


def evaluate(test_file: str | os.PathLike, prediction_file: str | os.PathLike, fill: bool = False,
             by_position: bool = False, raw: bool = False) -> Evaluation:
    """The official metric per task and per class. Answers are read by answers.py (CoT JSON parsed, near misses
    fixed, the rest invalid), or taken as written (`raw`); `fill` gives every record a label."""
    records = load_records(test_file, None, kind="train")
    answers, report, alignment = load_answers(records, prediction_file, fill=fill, by_position=by_position)
    if raw:
        preds, n_missing = raw_texts(records, alignment)
    else:
        preds = [a.scored for a in answers]
    golds = [r.output for r in records]
    tasks = [r.task for r in records]
    result = score(golds, preds, tasks)
    lines = [json.dumps(result["overall"])]  # the official tool's one line
    if not alignment.by_id:
        lines.append(f"paired {len(records)} predictions with the test records by position (--by_position)")
    if raw:
        lines.append("scored the raw strings (no CoT parsing, no label fixing)"
                     + (f"; {n_missing} missing predictions scored as the task's default label" if n_missing else ""))
    else:
        lines += report.lines()
    lines += [format_scores_table(result), format_per_class_table(result)]
    return Evaluation(result, golds, preds, tasks, lines)


def write_evaluation(evaluation: Evaluation, json_file: str | os.PathLike | None = None,
                     plot_dir: str | os.PathLike | None = None) -> list[Path]:
    """The scores as JSON and a confusion matrix per task (PNG and CSV), replaced together or not at all."""
    with OutputSet() as outs:
        if json_file:
            outs.write_json(json_file, evaluation.result)
        if plot_dir:
            for task in TASKS:
                idx = [i for i, t in enumerate(evaluation.tasks) if t == task]
                if idx:
                    plot_confusion(task, [evaluation.golds[i] for i in idx], [evaluation.preds[i] for i in idx],
                                   Path(plot_dir), outs)
        return outs.commit()


def write_submission(test_file: str | os.PathLike, prediction_file: str | os.PathLike, save_path: str | os.PathLike,
                     columns: str = "all", fill: bool = False, by_position: bool = False,
                     kind: str = "auto") -> list[str]:
    """The submission CSV (utf-8-sig, as the official tool): every test field + predict, or only id,predict.
    Empty or unmatched answers are written as they are, unless `fill`. Returns what a person reads about it."""
    import pandas as pd

    records = load_records(test_file, None, kind=kind)
    raw = read_json(test_file)
    answers, report, alignment = load_answers(records, prediction_file, fill=fill, by_position=by_position)
    labels = [a.label if a.label is not None else a.text for a in answers]
    lines = []
    if not alignment.by_id:
        lines.append(f"paired {len(records)} predictions with the test records by position (--by_position)")
    lines += report.lines()
    if alignment.missing:
        lines.append(f"filled {len(alignment.missing)} missing predictions: {alignment.missing[:10]}")
    if alignment.duplicates:
        lines.append(f"kept the first of duplicated predictions for {len(alignment.duplicates)} ids: "
                     f"{alignment.duplicates[:10]}")
    by_id = dict(zip((r.id for r in records), labels, strict=True))
    rows = [{**example, "predict": by_id[example["id"]]} if columns == "all"
            else {"id": example["id"], "predict": by_id[example["id"]]} for example in raw]
    with atomic_path(save_path) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False, encoding="utf-8-sig")
    per_task = Counter(r.task for r in records)
    lines.append(f"wrote {save_path}: {len(rows)} rows ({per_task.get('image', 0)} image, "
                 f"{per_task.get('dialogue', 0)} dialogue), columns {list(rows[0])}")
    return lines
