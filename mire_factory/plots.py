"""Every picture the project draws, in one style: label names in Chinese, set in Noto Sans SC.

The font comes from the `pylopdf-fonts-zh-cn` wheel (SIL OFL 1.1, a pip dependency, so a fresh machine has it
without any system font) and is registered with matplotlib's font manager from the package's path. Only when that
package is missing do the axes show short codes (I1.., D1..) and the caller writes the code key beside the picture.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .taxonomy import LABELS

FALLBACK_FONT = "DejaVu Sans"  # matplotlib's own; Latin text in a picture whose CJK font is missing


@functools.cache
def cjk_font_file() -> Path | None:
    """The packaged CJK font file, or None when the package (or its file) is missing."""
    try:
        from pylopdf_fonts_zh_cn import sans_path
    except ImportError:
        return None
    path = Path(sans_path())
    return path if path.is_file() else None


@functools.cache
def cjk_font() -> str | None:
    """The CJK font's family name, registered with matplotlib (once per process); None: draw numbered axes."""
    path = cjk_font_file()
    if path is None:
        return None
    from matplotlib import font_manager

    font_manager.fontManager.addfont(str(path))
    return font_manager.FontProperties(fname=str(path)).get_name()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: never a window, and no display needed
    import matplotlib.pyplot as plt

    return plt


@contextmanager
def style() -> Iterator:
    """pyplot with the project's font settings for the figures made inside the block."""
    plt = _pyplot()
    font = cjk_font()
    families = [font, FALLBACK_FONT] if font else [FALLBACK_FONT]
    with plt.rc_context({"font.family": "sans-serif", "font.sans-serif": families, "axes.unicode_minus": False}):
        yield plt


def label_codes(task: str, labels: Sequence[str]) -> dict[str, str]:
    """Axis names when no CJK font is there: I1.. (image) or D1.. (dialogue) by the official order, x1.. for
    strings outside the label set."""
    prefix = "I" if task == "image" else "D"
    official = LABELS.get(task, ())
    extras = [label for label in labels if label not in official]
    codes = {label: f"{prefix}{official.index(label) + 1}" for label in labels if label in official}
    return codes | {label: f"x{k}" for k, label in enumerate(extras, start=1)}


def _tick(name: str, limit: int = 24) -> str:
    """An axis name short enough for the margin (a raw answer outside the label set can be a paragraph)."""
    name = " ".join(name.split())
    return name if len(name) <= limit else name[: limit - 1] + "…"


def confusion_figure(matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str], task: str, *, title: str,
                     xlabel: str = "predicted", ylabel: str = "gold", key_hint: str = ""):
    """A confusion matrix (rows: gold, columns: predicted) with its counts written in the cells. Call inside
    `style()`. Without a CJK font the ticks are `label_codes` and `key_hint` (where the key is) ends the title."""
    plt = _pyplot()
    matrix = np.asarray(matrix)
    font = cjk_font()
    codes = label_codes(task, list(dict.fromkeys([*rows, *cols])))
    y_ticks = [_tick(x) for x in rows] if font else [codes[x] for x in rows]
    x_ticks = [_tick(x) for x in cols] if font else [codes[x] for x in cols]
    n_rows, n_cols = matrix.shape
    width = max(5.0, 0.42 * n_cols + 3.0) + (1.5 if font else 0.5)
    height = max(4.0, 0.42 * n_rows + 2.0) + (2.5 if font else 0.5)  # room for the rotated Chinese column names
    fig, ax = plt.subplots(figsize=(width, height))
    image = ax.imshow(matrix, cmap="Blues", aspect="auto")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(n_cols), x_ticks, rotation=90 if font else 0, fontsize=8)
    ax.set_yticks(range(n_rows), y_ticks, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title + ("" if font or not key_hint else f"\n{key_hint}"), fontsize=9)
    threshold = matrix.max() / 2 if matrix.size else 0
    for i in range(n_rows):
        for j in range(n_cols):
            if matrix[i, j]:
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if matrix[i, j] > threshold else "black")
    fig.tight_layout()
    return fig


def plot_confusion_matrix(matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str], task: str,
                          path: str | os.PathLike, *, title: str, xlabel: str = "predicted", ylabel: str = "gold",
                          key_hint: str = "") -> None:
    """`confusion_figure` written to `path` as a PNG (a staged temp path: the name needs no .png suffix)."""
    with style() as plt:
        fig = confusion_figure(matrix, rows, cols, task, title=title, xlabel=xlabel, ylabel=ylabel, key_hint=key_hint)
        fig.savefig(path, format="png", dpi=120)
        plt.close(fig)


def plot_histograms(values: Mapping[str, Sequence[int]], path: str | os.PathLike, *, title: str, xlabel: str,
                    ylabel: str) -> None:
    """Overlaid histograms on shared bins, one per named series (the legend gives each its count)."""
    with style() as plt:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        top = max((max(v) for v in values.values() if v), default=1)
        bins = list(range(0, top + 10, max(1, (top + 10) // 30)))
        for name, series in values.items():
            ax.hist(series, bins=bins, alpha=0.55, label=f"{name} (n={len(series)})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=110)
        plt.close(fig)


def plot_eval_f1_curves(curves: Mapping[str, Sequence[Mapping]], lines: Mapping[str, float | None],
                        path: str | os.PathLike, losses: Mapping[str, Sequence[Mapping]] | None = None) -> None:
    """The F1 callback's eval_f1_dialogue / eval_f1_image per optimizer step, one curve per run, side by side;
    `lines` ("dialogue: NAME" or "image: NAME" -> value) are drawn as horizontal references. With `losses` (run ->
    [{"step", "loss"}], a loss of None: not finite, left as a gap) a third panel shows each run's training loss, in
    the run's colour of the F1 panels. Every panel's x-axis starts at step 0, so that a single evaluation (at the
    last step) sits in the run's context."""
    losses = {label: curve for label, curve in (losses or {}).items() if curve}
    runs = list(dict.fromkeys([*curves, *losses]))
    with style() as plt:
        palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        colour = {label: palette[k % len(palette)] for k, label in enumerate(runs)}
        steps = [c["step"] for curve in [*curves.values(), *losses.values()] for c in curve]
        right = max(steps, default=1) * 1.04 or 1
        fig, axes = plt.subplots(1, 3 if losses else 2, figsize=(16.5 if losses else 11, 4.2))
        for ax, key, task in ((axes[0], "eval_f1_dialogue", "dialogue"), (axes[1], "eval_f1_image", "image")):
            for label, curve in curves.items():
                points = [(c["step"], c[key]) for c in curve if key in c]
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", color=colour[label], label=label)
            for name, value in lines.items():
                if name.startswith(task) and value is not None:
                    ax.axhline(value, linestyle="--", color="grey" if "untrained" in name else "black", linewidth=1,
                               label=name.split(": ", 1)[1])
            ax.set_title(f"{task}: weighted F1 on the test split (F1 callback)", fontsize=10)
            ax.set_ylabel("weighted F1")
            ax.set_ylim(0, 1)
        if losses:
            ax = axes[2]
            gaps = 0
            for label, curve in losses.items():
                gaps += sum(c["loss"] is None for c in curve)
                ax.plot([c["step"] for c in curve], [np.nan if c["loss"] is None else c["loss"] for c in curve],
                        color=colour[label], linewidth=1.2, label=label)
            ax.set_title("training loss (logged steps)" + (f"; {gaps} not finite (gaps)" if gaps else ""), fontsize=10)
            ax.set_ylabel("loss")
            ax.set_ylim(bottom=0)
        for ax in axes:
            ax.set_xlim(0, right)
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=120)
        plt.close(fig)


def plot_loss_curves(curves: Mapping[str, Sequence[tuple[int, float]]], path: str | os.PathLike, *,
                     title: str) -> None:
    """Training loss per optimizer step, one line per run (benchmarks/gpu/loss_compare.py); the first run, the
    reference, drawn last and dashed so that a curve lying on it stays visible."""
    with style() as plt:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        items = list(curves.items())
        for label, points in items[1:] + items[:1]:
            ax.plot(*zip(*points, strict=True), label=label, linewidth=1.2,
                    linestyle="--" if label == items[0][0] else "-", color="black" if label == items[0][0] else None)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=120)
        plt.close(fig)
