"""The MIRE label sets, their official definitions and the official instruction texts: the one source of truth.

Both tasks' label lists are kept exactly as the official prompts list them, in that order.
"""

from __future__ import annotations

import difflib
import json
import re
import unicodedata
from typing import Literal

Task = Literal["image", "dialogue"]
TASKS: tuple[Task, ...] = ("image", "dialogue")

IMAGE_LABELS: tuple[str, ...] = (
    "实物拍摄(含售后)",
    "商品分类选项",
    "商品头图",
    "商品详情页截图",
    "下单过程中出现异常（显示购买失败浮窗）",
    "订单详情页面",
    "支付页面",
    "消费者与客服聊天页面",
    "评论区截图页面",
    "物流页面-物流列表页面",
    "物流页面-物流跟踪页面",
    "物流页面-物流异常页面",
    "退款页面",
    "退货页面",
    "换货页面",
    "购物车页面",
    "店铺页面",
    "活动页面",
    "优惠券领取页面",
    "账单/账户页面",
    "个人信息页面",
    "投诉举报页面",
    "平台介入页面",
    "外部APP截图",
    "其他类别图片",
)

# Listed in the official prompt but absent from the released data: valid answers, never a fuzzy-match target.
RETIRED_IMAGE_LABELS: frozenset[str] = frozenset({"消费者与客服聊天页面", "个人信息页面"})

DIALOGUE_LABELS: tuple[str, ...] = (
    "反馈密封性不好",
    "是否好用",
    "是否会生锈",
    "排水方式",
    "包装区别",
    "发货数量",
    "反馈用后症状",
    "商品材质",
    "功效功能",
    "是否易褪色",
    "适用季节",
    "能否调光",
    "版本款型区别",
    "单品推荐",
    "用法用量",
    "控制方式",
    "上市时间",
    "商品规格",
    "信号情况",
    "养护方法",
    "套装推荐",
    "何时上货",
    "气泡",
)

IMAGE_DEFINITIONS: dict[str, str] = {
    "实物拍摄(含售后)": "用户用相机实拍的照片，包括用户售后的照片（损坏、缺失、与描述不符），或者其他用相机实拍的图片",
    "商品分类选项": "商品颜色、规格选项",
    "商品头图": "商品首页大图",
    "商品详情页截图": "可能出现在商品详情页各个部分的截图",
    "下单过程中出现异常（显示购买失败浮窗）": "下单过程中出现异常（显示购买失败浮窗）的截图",
    "订单详情页面": "呈现出完整订单信息的订单页面",
    "支付页面": "包含支付方式选择、支付成功的页面",
    "消费者与客服聊天页面": "淘宝APP中与平台小蜜/商家或其他客服的聊天页面",
    "评论区截图页面": "在淘宝APP内或其他APP内的评论区截图",
    "物流页面-物流列表页面": "呈现出两个以上物流信息的页面",
    "物流页面-物流跟踪页面": "呈现出物流运输路径的页面",
    "物流页面-物流异常页面": "包含物流异常信息的页面",
    "退款页面": "含有退款信息的页面",
    "退货页面": "含有退货信息的页面",
    "换货页面": "含有换货信息的页面",
    "购物车页面": "淘宝购物车页面的列表图或金额计算图",
    "店铺页面": "店铺首页截图",
    "活动页面": "活动截图",
    "优惠券领取页面": "店铺首页或活动页中领取优惠券的截图",
    "账单/账户页面": "包含交易明细列表、资产列表、卡券红包列表等",
    "个人信息页面": "与用户个人信息有关的各种页面",
    "投诉举报页面": "投诉或举报页面",
    "平台介入页面": "平台客服介入处理的截图",
    "外部APP截图": "各种非淘宝、菜鸟APP的截图，包括京东、拼多多、短信、手机系统截图",
    "其他类别图片": "拿不准的其他图片",
}

DIALOGUE_DEFINITIONS: dict[str, str] = {
    "反馈密封性不好": "买家反馈商品密封性差会漏",
    "是否好用": "买家咨询商品是否好用",
    "是否会生锈": "咨询商品是否会生锈",
    "排水方式": "（适用产品：洗衣机、热水器）咨询商品排水方式",
    "包装区别": "咨询商品不同包装的区别",
    "发货数量": "咨询商品发货数量",
    "反馈用后症状": "买家反馈用完后引起的人体反应",
    "商品材质": "咨询商品具体材质，配件材质，填充物",
    "功效功能": "咨询商品功效功能",
    "是否易褪色": "咨询商品是否易褪色",
    "适用季节": "咨询商品适用季节",
    "能否调光": "咨询商品光源/灯光/光线/亮度是否可调",
    "版本款型区别": "咨询两个版本/型号/款式/类型/套装/组合等区别，不包括商品数量/重量/尺寸类区别",
    "单品推荐": "消费者咨询能否帮助推荐一下某类/某个商品，非sku级别",
    "用法用量": "咨询商品使用方法/步骤/顺序，包括但不限于用量，使用时间，使用部位",
    "控制方式": "咨询商品如何控制，能否可以通过手机/电脑控制",
    "上市时间": "咨询商品的上市时间",
    "商品规格": "咨询商品的数量、重量、含量、容量",
    "信号情况": "咨询手机使用的信号是否良好，以及信号不佳如何处理",
    "养护方法": "咨询商品的养护方法",
    "套装推荐": "消费者希望能推荐一些套装",
    "何时上货": "咨询补货/上货时间",
    "气泡": "咨询贴膜如何避免产生气泡及除气泡方法",
}

LABELS: dict[Task, tuple[str, ...]] = {"image": IMAGE_LABELS, "dialogue": DIALOGUE_LABELS}
DEFINITIONS: dict[Task, dict[str, str]] = {"image": IMAGE_DEFINITIONS, "dialogue": DIALOGUE_DEFINITIONS}


def _label_list_json(labels: tuple[str, ...]) -> str:
    return json.dumps(list(labels), ensure_ascii=False, separators=(",", ":"))


# The official instructions, verbatim (punctuation included: the image prompt uses half-width commas).
IMAGE_INSTRUCTION = (
    "Picture 1: <image>\n你是一个电商领域识图专家,可以理解消费者上传的软件截图或实物拍摄图。现在,请你对消费者上传的图片进行分类。"
    "你只需要回答图片分类结果,不需要其他多余的话。以下是可以参考的分类标签,分类标签:" + _label_list_json(IMAGE_LABELS) + "。"
)
DIALOGUE_HEADER = "你是一个电商客服专家，请根据用户与客服的多轮对话判断用户的意图分类标签。\n<用户与客服的对话 START>\n"
DIALOGUE_FOOTER = (
    "<用户与客服的对话 END>\n请直接只输出分类标签结果，不需要其他多余的话。以下是可以参考的分类标签为："
    + _label_list_json(DIALOGUE_LABELS)
    + "\n"
)
DIALOGUE_START = "<用户与客服的对话 START>"
DIALOGUE_END = "<用户与客服的对话 END>"
USER_PREFIX = "用户: "
AGENT_PREFIX = "客服: "

_IMAGE_MARKERS = ("识图专家", "图片分类")
_DIALOGUE_MARKERS = (DIALOGUE_START, "多轮对话")


def build_dialogue_instruction(turns: list[tuple[str, str]]) -> str:
    """turns: (speaker, text) with speaker "用户" or "客服"; text may hold <image> and <http>."""
    body = "".join(f"{speaker}: {text}\n" for speaker, text in turns)
    return DIALOGUE_HEADER + body + DIALOGUE_FOOTER


def detect_task(instruction: str) -> Task:
    """Which MIRE task an instruction belongs to; ValueError when it is neither."""
    if not isinstance(instruction, str):
        raise ValueError(f"instruction is {type(instruction).__name__}, not text")
    if any(m in instruction for m in _DIALOGUE_MARKERS):
        return "dialogue"
    if any(m in instruction for m in _IMAGE_MARKERS):
        return "image"
    head = instruction[:40].replace("\n", " ")
    raise ValueError(f"cannot tell the task: the instruction is neither the image nor the dialogue prompt ({head!r}...)")


_QUOTES = "\"'`“”‘’「」『』《》〈〉【】[]{}"
_TRAILING = "。.，,；;：:！!？?、 \t\r\n"
_PREFIXES = ("分类标签", "分类结果", "标签", "答案", "类别", "所属类别", "意图", "label", "answer")


def _width_fold(text: str) -> str:
    # NFKC folds full-width ASCII and punctuation (（ -> (, ： -> :) so both spellings in the data compare equal.
    return unicodedata.normalize("NFKC", text)


def normalize_label(text: str) -> str:
    """Canonical label when `text` is one up to spacing, quoting, bracket width or trailing punctuation; else the
    cleaned text. Never raises."""
    if text is None:
        return ""
    cleaned = str(text).strip()
    for _ in range(3):
        before = cleaned
        cleaned = cleaned.strip().strip(_QUOTES).strip(_TRAILING)
        low = cleaned.lower()
        for prefix in _PREFIXES:
            if low.startswith(prefix) and len(cleaned) > len(prefix):
                rest = cleaned[len(prefix) :].lstrip()
                if rest[:1] in (":", "：", "是", "为"):
                    cleaned = rest[1:].strip()
                    break
        if cleaned == before:
            break
    return _CANONICAL.get(_key(cleaned), cleaned)


def _key(text: str) -> str:
    return re.sub(r"\s+", "", _width_fold(text)).lower()


_CANONICAL: dict[str, str] = {_key(label): label for labels in LABELS.values() for label in labels}


def task_of_label(label: str) -> Task | None:
    canonical = normalize_label(label)
    for task, labels in LABELS.items():
        if canonical in labels:
            return task
    return None


def is_valid_label(text: str, task: Task) -> bool:
    return normalize_label(text) in LABELS[task]


Evidence = Literal["exact", "contained", "truncated", "similar", "empty"]


def match_label(text: str, task: Task) -> tuple[str, Evidence, float]:
    """The nearest valid label of `task`, the evidence for it, and a score in [0, 1].

    Order of evidence: exact match after normalization (score 1); the longest label contained in the text (padded
    answers); the shortest label the text is a prefix of, from 2 characters (truncated answers); then character
    similarity (difflib's ratio, the score; garbled answers). Empty text gets the task's default at score 0. Ties go
    to the label listed first, so the result is deterministic.
    """
    labels = LABELS[task]
    canonical = normalize_label(text)
    if canonical in labels:
        return canonical, "exact", 1.0
    key = _key(canonical)
    candidates = [label for label in labels if label not in RETIRED_IMAGE_LABELS]
    if not key:
        return (candidates[-1] if task == "image" else candidates[0]), "empty", 0.0
    contained = [label for label in labels if _key(label) in key]
    if contained:
        best = max(contained, key=lambda label: len(_key(label)))
        return best, "contained", len(_key(best)) / max(len(key), len(_key(best)))
    prefixed = [label for label in candidates if _key(label).startswith(key)]
    if prefixed and len(key) >= 2:
        best = min(prefixed, key=lambda label: len(_key(label)))
        return best, "truncated", len(key) / len(_key(best))
    best_label, best_score = label_similarities(text, task)[0]
    return best_label, "similar", best_score


def label_similarities(text: str, task: Task) -> list[tuple[str, float]]:
    """(label, difflib's ratio with the normalized text) for every label of the task a fix may choose (retired
    labels never), best first; equal ratios keep the official order."""
    key = _key(normalize_label(text))
    candidates = [label for label in LABELS[task] if label not in RETIRED_IMAGE_LABELS]
    scores = [(label, round(difflib.SequenceMatcher(None, key, _key(label), autojunk=False).ratio(), 6))
              for label in candidates]
    return sorted(scores, key=lambda pair: -pair[1])


def fix_label(text: str, task: Task) -> tuple[str, float]:
    """The nearest valid label of `task` (match_label's) and a score in [0, 1] ordered by evidence: 1.0 exact, then
    contained (0.1-1.0), truncated (0.5-0.9), similar (0-0.8, difflib's ratio scaled)."""
    label, evidence, score = match_label(text, task)
    if evidence == "contained":
        return label, 0.9 * score + 0.1
    if evidence == "truncated":
        return label, 0.5 + 0.4 * score
    if evidence == "similar":
        return label, round(0.8 * score, 6)
    return label, score
