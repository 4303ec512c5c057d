"""plots: the packaged CJK font is what draws the label names, every glyph of them; codes only without it."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from matplotlib import font_manager
from PIL import Image

from mire_factory import plots
from mire_factory.taxonomy import LABELS


def _glyph_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "missing from font" in str(w.message)]


def _render(task: str, cols_extra: list[str], path: Path, title: str) -> tuple[list[str], list[str], list[str], set]:
    """Draws the task's full label set (plus odd columns) and saves it; returns x ticks, y ticks, glyph warnings
    and the font files the ticks resolve to."""
    rows = list(LABELS[task])
    cols = rows + cols_extra
    matrix = np.arange(len(rows) * len(cols)).reshape(len(rows), len(cols)) % 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with plots.style() as plt:
            fig = plots.confusion_figure(matrix, rows, cols, task, title=title, key_hint="key: x.csv")
            xs, ys = fig.axes[0].get_xticklabels(), fig.axes[0].get_yticklabels()
            fonts = {str(Path(font_manager.findfont(t.get_fontproperties(), fallback_to_default=False))) for t in xs + ys}
            fig.savefig(path, format="png", dpi=60)
            plt.close(fig)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 200
    return [t.get_text() for t in xs], [t.get_text() for t in ys], _glyph_warnings(caught), fonts


def test_the_packaged_font_draws_every_label_name(tmp_path):
    path = plots.cjk_font_file()
    assert path is not None, "pylopdf-fonts-zh-cn is a dependency: pip install -e ."
    assert plots.cjk_font() == "Noto Sans SC"
    for task in LABELS:
        xs, ys, missing, fonts = _render(task, ["一段很长很长的不在标签集里的模型回答，超过了坐标轴的宽度"], tmp_path / f"{task}.png",
                                        f"{task}: 混淆矩阵")
        assert ys == list(LABELS[task]) and xs[:-1] == list(LABELS[task])
        assert xs[-1].endswith("…") and len(xs[-1]) == 24
        assert fonts == {str(path)}  # the tick labels are set in the packaged file, not a system font
        assert missing == []  # no glyph of any label name fell back to a font without it


def test_without_the_font_the_axes_show_codes_and_nothing_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(plots, "cjk_font", lambda: None)
    xs, ys, missing, _ = _render("dialogue", ["其他"], tmp_path / "codes.png", "dialogue: confusion")
    assert ys == [f"D{k}" for k in range(1, len(LABELS["dialogue"]) + 1)] and xs == ys + ["x1"]
    assert missing == []


@pytest.mark.parametrize("task", ["image", "dialogue"])
def test_label_codes_follow_the_official_order(task):
    labels = [LABELS[task][2], "not a label", LABELS[task][0], "also not"]
    prefix = "I" if task == "image" else "D"
    assert plots.label_codes(task, labels) == {LABELS[task][2]: f"{prefix}3", LABELS[task][0]: f"{prefix}1",
                                               "not a label": "x1", "also not": "x2"}
