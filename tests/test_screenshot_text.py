"""The screenshot-text block: rendering, the token budget with the real Qwen2 tokenizer, lookups by image bytes."""

from __future__ import annotations

import pytest
from PIL import Image

from mire_factory.image_info import InfoRecord, file_sha256
from mire_factory.io import MireInputError
from mire_factory.records import load_records
from mire_factory.screenshot_text import ScreenshotText, fit_block, qwen2_counter, render_block
from mire_factory.synthetic import make_records, write_dataset

RETURN_PAGE = ["选择退货方式", "商家已同意退货", "请使用菜鸟裹裹寄回商品", "您有退货运费未付", "支付后才可使用在线寄件",
               "去支付或去反馈问题>>", "寄件商品", "颜色分类：粉红草莓熊三件套[全车坐垫]"]


def test_render_block_one_and_several_images():
    assert render_block([]) == ""
    assert render_block([["a", "b"]]) == "图片中的文字：\na\nb"
    assert render_block([["a"], [], ["c"]]) == "图片中的文字：\n[图片1]\na\n[图片2]\n无\n[图片3]\nc"


@pytest.mark.parametrize("budget", [200, 60, 40, 25, 16])
def test_fit_block_respects_the_budget_with_whole_lines_from_the_longest(budget):
    count = qwen2_counter()
    texts = ["\n".join(RETURN_PAGE), "ORDER 1\nTRACK 2"]
    block, dropped = fit_block(texts, budget, count)
    assert count(block) <= budget
    lines = block.split("\n")
    first = lines[lines.index("[图片1]") + 1: lines.index("[图片2]")]
    second = lines[lines.index("[图片2]") + 1:]
    kept_first = [] if first == ["无"] else first
    kept_second = [] if second == ["无"] else second
    assert kept_first == RETURN_PAGE[: len(kept_first)]  # a prefix of whole lines, in reading order
    assert kept_second == ["ORDER 1", "TRACK 2"][: len(kept_second)]
    assert dropped == len(RETURN_PAGE) - len(kept_first) + 2 - len(kept_second)
    if dropped:  # the budget is used: one more line would not fit
        assert count(block) > budget - 12
    if budget >= 40:
        assert kept_second == ["ORDER 1", "TRACK 2"]  # the short text keeps its lines; the long one gives way
    if budget == 200:
        assert dropped == 0


def test_fit_block_refuses_a_budget_below_the_heads():
    with pytest.raises(MireInputError, match="--info_max_tokens 3"):
        fit_block(["a", "b"], 3, qwen2_counter())


@pytest.fixture
def records_and_info(tmp_path):
    write_dataset(tmp_path / "train.json", make_records(3, 4, tmp_path / "images", seed=4, max_dialogue_images=3))
    records = load_records(tmp_path / "train.json", tmp_path / "images")
    lines = []
    for k, path in enumerate(sorted((tmp_path / "images").iterdir())):
        lines.append(InfoRecord(path.name, file_sha256(path), "ocr", "m", "ok", text=f"第{k}张\n文字{k}").to_json())
    (tmp_path / "info.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return records, tmp_path


def test_contexts_by_image_bytes_and_missing_images_named(records_and_info):
    records, root = records_and_info
    contexts = ScreenshotText(root / "info.jsonl", 64).contexts(records, root / "images", root / "train.json")
    for record, context in zip(records, contexts, strict=True):
        if not record.images:
            assert context is None
        else:
            assert context.startswith("图片中的文字：") and context.count("张") == len(record.images)
    # an image changed after extraction: its text is not used, and the message says why
    record = next(r for r in records if r.images)
    Image.new("RGB", (30, 30), "red").save(root / "images" / record.images[0])
    with pytest.raises(MireInputError) as err:
        ScreenshotText(root / "info.jsonl", 64).contexts(records, root / "images", root / "train.json")
    assert f"record {record.id!r}" in str(err.value) and "made from other bytes" in str(err.value)
