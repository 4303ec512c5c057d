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


def _eval_f1_figure(tmp_path: Path, monkeypatch, losses) -> tuple:
    """plot_eval_f1_curves' figure (caught at savefig) and the PNG it wrote."""
    from matplotlib.figure import Figure

    figures, savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), savefig(fig, *a, **k))[1])
    curves = {"seed 0": [{"step": 180, "eval_f1_dialogue": 0.6, "eval_f1_image": 0.1}],
              "seed 0, 截图文字": [{"step": 90, "eval_f1_dialogue": 0.5}, {"step": 180, "eval_f1_dialogue": 0.7,
                                                                       "eval_f1_image": 0.66}]}
    path = tmp_path / "curves"  # a staged temp path: no .png suffix
    plots.plot_eval_f1_curves(curves, {"dialogue: untrained": 0.01, "image: untrained": None}, path, losses)
    with Image.open(path) as image:
        assert image.format == "PNG"
        size = image.size
    return figures[0], size


def test_eval_f1_curves_with_loss_panel_start_at_step_0_and_share_colours(tmp_path, monkeypatch):
    losses = {"seed 0": [{"step": 1, "loss": 2.0}, {"step": 5, "loss": None}, {"step": 180, "loss": 0.4}],
              "seed 0, 截图文字": [{"step": 1, "loss": 1.9}, {"step": 180, "loss": 0.1}]}
    fig, (width, _) = _eval_f1_figure(tmp_path, monkeypatch, losses)
    dialogue, image, loss = fig.axes
    assert width == 1980  # three panels at 16.5 in x 120 dpi
    for ax in (dialogue, image, loss):
        assert ax.get_xlim()[0] == 0 and ax.get_xlim()[1] >= 180
    assert dialogue.get_ylim() == (0, 1) and image.get_ylim() == (0, 1)
    colours = {ax: {line.get_label(): line.get_color() for line in ax.get_lines()} for ax in (dialogue, loss)}
    assert colours[loss] == {k: colours[dialogue][k] for k in losses}  # a run's colour is the same in every panel
    assert colours[loss]["seed 0"] != colours[loss]["seed 0, 截图文字"]
    seed0 = next(line for line in loss.get_lines() if line.get_label() == "seed 0")
    assert list(seed0.get_xdata()) == [1, 5, 180] and np.isnan(seed0.get_ydata()[1])  # a gap, not a zero
    assert "1 not finite" in loss.get_title()
    assert "untrained" in [t.get_text() for t in dialogue.get_legend().get_texts()]  # the reference line stays


@pytest.mark.parametrize("losses", [None, {}, {"seed 0": []}])
def test_eval_f1_curves_without_loss_curves_keep_two_panels(tmp_path, monkeypatch, losses):
    fig, (width, _) = _eval_f1_figure(tmp_path, monkeypatch, losses)
    assert len(fig.axes) == 2 and width == 1320
    assert all(ax.get_xlim()[0] == 0 for ax in fig.axes)
