"""The official MIRE metric: per task, scikit-learn's weighted precision/recall/F1 and accuracy; overall is the mean
of the two task scores (0.8648 and 0.7116 give the official 0.7882). The pooled figure over all records is kept
beside it because it weighs the tasks by their record counts instead."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from . import plots
from .io import OutputSet
from .taxonomy import LABELS, TASKS

METRICS: tuple[str, ...] = ("f1", "accuracy", "precision", "recall")


def task_scores(golds: Sequence[str], preds: Sequence[str]) -> dict[str, float]:
    """Weighted scores as the official tool computes them (zero_division=0: sklearn's default value, minus the warning)."""
    precision, recall, f1, _ = precision_recall_fscore_support(golds, preds, average="weighted", zero_division=0)
    return {
        "f1": float(f1),
        "accuracy": float(accuracy_score(golds, preds)),
        "precision": float(precision),
        "recall": float(recall),
    }


def class_order(task: str, golds: Sequence[str], preds: Sequence[str]) -> list[str]:
    """The task's labels seen in golds or preds in the official order, then any other strings (raw scoring)."""
    seen = set(golds) | set(preds)
    known = [label for label in LABELS.get(task, ()) if label in seen]
    return known + sorted(seen - set(known))


def per_class_scores(task: str, golds: Sequence[str], preds: Sequence[str]) -> dict[str, dict[str, float]]:
    labels = class_order(task, golds, preds)
    precision, recall, f1, support = precision_recall_fscore_support(
        golds, preds, labels=labels, average=None, zero_division=0
    )
    return {
        label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for label, p, r, f, s in zip(labels, precision, recall, f1, support, strict=True)
    }


def score(golds: list[str], preds: list[str], tasks: list[str]) -> dict:
    """{"overall", "image", "dialogue", "pooled", "per_class"}; a task with no records scores None and overall is
    then the other task's scores. Preds are compared as given: fixing labels is the caller's step."""
    if not (len(golds) == len(preds) == len(tasks)):
        raise ValueError(f"golds, preds and tasks differ in length: {len(golds)}, {len(preds)}, {len(tasks)}")
    if not golds:
        raise ValueError("nothing to score: no records")
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; expected {list(TASKS)}")
    result: dict = {"overall": None, "image": None, "dialogue": None, "pooled": task_scores(golds, preds), "per_class": {}}
    present = []
    for task in TASKS:
        idx = [i for i, t in enumerate(tasks) if t == task]
        if not idx:
            continue
        g, p = [golds[i] for i in idx], [preds[i] for i in idx]
        result[task] = task_scores(g, p)
        result["per_class"][task] = per_class_scores(task, g, p)
        present.append(result[task])
    result["overall"] = {m: sum(s[m] for s in present) / len(present) for m in METRICS}
    return result


def format_scores_table(result: dict) -> str:
    rows = [("overall (mean of tasks)", result["overall"])]
    rows += [(task, result[task]) for task in TASKS if result[task] is not None]
    rows.append(("pooled (all records)", result["pooled"]))
    width = max(len(name) for name, _ in rows)
    lines = [f"{'':<{width}}  " + "  ".join(f"{m:>9}" for m in METRICS)]
    lines += [f"{name:<{width}}  " + "  ".join(f"{s[m]:>9.4f}" for m in METRICS) for name, s in rows]
    return "\n".join(lines)


def format_per_class_table(result: dict) -> str:
    lines = []
    for task, classes in result["per_class"].items():
        lines.append(f"[{task}]  {'precision':>9}  {'recall':>9}  {'f1':>9}  {'support':>7}  label")
        for label, s in classes.items():
            lines.append(f"{'':<{len(task) + 2}}  {s['precision']:>9.4f}  {s['recall']:>9.4f}  {s['f1']:>9.4f}  "
                         f"{s['support']:>7d}  {label}")
    return "\n".join(lines)


def plot_confusion(
    task: str, golds: Sequence[str], preds: Sequence[str], out_dir: str | os.PathLike, outs: OutputSet | None = None
) -> tuple[Path, Path]:
    """confusion_<task>.png (rows: gold, columns: predicted) and confusion_<task>.csv with the label names, staged
    in `outs` (committed by the caller with its other files), else written at once."""
    import pandas as pd

    if outs is None:
        with OutputSet() as own:
            return plot_confusion(task, golds, preds, out_dir, own)
    labels = class_order(task, golds, preds)
    matrix = confusion_matrix(golds, preds, labels=labels)
    out_dir = Path(out_dir)
    accuracy = matrix.trace() / max(matrix.sum(), 1)
    png = out_dir / f"confusion_{task}.png"
    plots.plot_confusion_matrix(matrix, labels, labels, task, outs.path(png),
                                title=f"{task}: {matrix.sum()} records, accuracy {accuracy:.4f}",
                                key_hint=f"label codes: confusion_{task}.csv")
    codes = plots.label_codes(task, labels)
    names = [f"{codes[label]} {label}" for label in labels]
    csv = out_dir / f"confusion_{task}.csv"
    pd.DataFrame(matrix, index=names, columns=names).to_csv(outs.path(csv), encoding="utf-8-sig",
                                                            index_label="gold \\ predicted")
    return png, csv
