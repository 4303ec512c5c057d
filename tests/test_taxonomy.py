import json

import pytest

from mire_factory.taxonomy import (
    DIALOGUE_DEFINITIONS,
    DIALOGUE_LABELS,
    IMAGE_DEFINITIONS,
    IMAGE_INSTRUCTION,
    IMAGE_LABELS,
    RETIRED_IMAGE_LABELS,
    detect_task,
    fix_label,
    normalize_label,
)


def _listed(instruction: str, marker: str) -> list[str]:
    start = instruction.index("[", instruction.index(marker))
    return json.loads(instruction[start : instruction.index("]", start) + 1])


def test_labels_match_the_official_prompts(mire_sample):
    records = json.loads((mire_sample / "train_sample.json").read_text(encoding="utf-8"))
    image_prompt = next(r["instruction"] for r in records if "识图专家" in r["instruction"])
    dialogue_prompt = next(r["instruction"] for r in records if "多轮对话" in r["instruction"])
    assert _listed(image_prompt, "分类标签:") == list(IMAGE_LABELS)
    assert _listed(dialogue_prompt, "分类标签为：") == list(DIALOGUE_LABELS)
    assert image_prompt == IMAGE_INSTRUCTION


def test_label_counts_and_definitions():
    assert len(IMAGE_LABELS) == 25 and len(set(IMAGE_LABELS)) == 25
    assert len(DIALOGUE_LABELS) == 23 and len(set(DIALOGUE_LABELS)) == 23
    assert set(IMAGE_DEFINITIONS) == set(IMAGE_LABELS)
    assert set(DIALOGUE_DEFINITIONS) == set(DIALOGUE_LABELS)
    assert RETIRED_IMAGE_LABELS == {"消费者与客服聊天页面", "个人信息页面"}
    assert IMAGE_LABELS[0] == "实物拍摄(含售后)" and IMAGE_LABELS[-1] == "其他类别图片"
    assert DIALOGUE_LABELS[0] == "反馈密封性不好" and DIALOGUE_LABELS[-1] == "气泡"


def test_detect_task(mire_sample):
    records = json.loads((mire_sample / "train_sample.json").read_text(encoding="utf-8"))
    tasks = [detect_task(r["instruction"]) for r in records]
    assert tasks.count("image") == 12 and tasks.count("dialogue") == 12
    with pytest.raises(ValueError, match="cannot tell the task"):
        detect_task("请告诉我今天的天气")


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("实物拍摄（含售后）", "实物拍摄(含售后)"),
        ("下单过程中出现异常(显示购买失败浮窗)", "下单过程中出现异常（显示购买失败浮窗）"),
        ('  "退货页面"。', "退货页面"),
        ("【何时上货】", "何时上货"),
        ("标签：气泡", "气泡"),
        ("外部ＡＰＰ截图", "外部APP截图"),
        ("物流页面 - 物流列表页面.", "物流页面-物流列表页面"),
    ],
)
def test_normalize_label(raw, expected):
    assert normalize_label(raw) == expected


@pytest.mark.parametrize(
    "raw, task, expected",
    [
        ("退货页面", "image", "退货页面"),
        ("物流页面-物流跟", "image", "物流页面-物流跟踪页面"),  # truncated
        ("这张图片属于退款页面。", "image", "退款页面"),  # padded
        ("优惠卷领取页面", "image", "优惠券领取页面"),  # garbled
        ("何时上", "dialogue", "何时上货"),
        ("用户的意图是：版本款型区别", "dialogue", "版本款型区别"),
        ("反馈密封性差", "dialogue", "反馈密封性不好"),
        ("商品规格规格规格", "dialogue", "商品规格"),
        ("实物拍摄", "image", "实物拍摄(含售后)"),
    ],
)
def test_fix_label_on_garbled_outputs(raw, task, expected):
    label, score = fix_label(raw, task)
    assert label == expected
    assert 0.0 <= score <= 1.0


def test_fix_label_exact_wins_and_is_deterministic():
    for task, labels in (("image", IMAGE_LABELS), ("dialogue", DIALOGUE_LABELS)):
        for label in labels:
            assert fix_label(label, task) == (label, 1.0)
    assert fix_label("zzz", "dialogue") == fix_label("zzz", "dialogue")
    assert fix_label("退款页面", "dialogue")[0] in DIALOGUE_LABELS  # never crosses tasks


def test_fix_label_never_guesses_a_retired_label():
    label, score = fix_label("个人信息页", "image")
    assert label not in RETIRED_IMAGE_LABELS and score < 1.0
