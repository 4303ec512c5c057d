"""Prompt texts beyond the official instructions: label definitions, the CoT answer format, teacher prompts."""

from __future__ import annotations

import json

from .taxonomy import DEFINITIONS, LABELS, Task

REASON_KEY = "理由"
LABEL_KEY = "所属类别"
# The user's follow-up in tools.merge_cot's second_turn layout: after the bare label, "why?"; the reason answers it.
REASON_QUESTION = "原因为何？"


def definitions_text(task: Task) -> str:
    """The official definition of every label of the task, one per line, in the official order."""
    lines = [f"- {label}：{DEFINITIONS[task][label]}" for label in LABELS[task]]
    return "各分类标签的定义如下：\n" + "\n".join(lines)


def answer_format_instruction(label_position: str = "last") -> str:
    keys = [REASON_KEY, LABEL_KEY] if label_position == "last" else [LABEL_KEY, REASON_KEY]
    example = "{" + ", ".join(f'"{k}": "..."' for k in keys) + "}"
    return f"请先简要说明理由，再给出分类标签，只输出如下JSON格式：{example}" if label_position == "last" else (
        f"请先给出分类标签，再简要说明理由，只输出如下JSON格式：{example}"
    )


def format_cot_answer(reason: str, label: str, label_position: str = "last") -> str:
    """The assistant turn of CoT data; compact JSON so that it costs few tokens."""
    pairs = [(REASON_KEY, reason), (LABEL_KEY, label)]
    if label_position == "first":
        pairs.reverse()
    return json.dumps(dict(pairs), ensure_ascii=False)


def cot_user_suffix(task: Task, label_position: str = "last") -> str:
    """Appended to a CoT record's user turn: the definitions and the answer format."""
    return "\n" + definitions_text(task) + "\n" + answer_format_instruction(label_position)


# Teacher prompts of the data study. Mode 1 hides the gold label; modes 2 and 3 give it with every definition.
TEACHER_MODE_1 = (
    "请仔细阅读上面的内容，在给出的分类标签中选出最合适的一个，并说明理由。\n"
    + '只输出JSON：{"理由": "你的分析", "所属类别": "分类标签"}'
)
TEACHER_MODE_2 = (
    "这条样本的正确分类标签是「{label}」。\n{definitions}\n"
    "请结合上面的内容和标签定义，说明为什么它属于「{label}」而不是其他标签。\n"
    + '只输出JSON：{{"理由": "你的分析", "所属类别": "{label}"}}'
)
TEACHER_MODE_3 = (
    "这条样本的正确分类标签是「{label}」。\n{definitions}\n"
    "请结合上面的内容和标签定义，用不超过{max_chars}个字说明为什么它属于「{label}」。\n"
    + '只输出JSON：{{"理由": "不超过{max_chars}字的理由", "所属类别": "{label}"}}'
)


def teacher_prompt(mode: int, task: Task, gold_label: str | None = None, max_chars: int = 100) -> str:
    """The text appended after a record's instruction for teacher mode 1, 2 or 3."""
    if mode == 1:
        return TEACHER_MODE_1
    if gold_label is None:
        raise ValueError(f"teacher mode {mode} needs the gold label")
    template = TEACHER_MODE_2 if mode == 2 else TEACHER_MODE_3 if mode == 3 else None
    if template is None:
        raise ValueError(f"teacher mode must be 1, 2 or 3, got {mode}")
    return template.format(label=gold_label, definitions=definitions_text(task), max_chars=max_chars)


# Information extraction from one image (tools.extract_info --backend teacher), as the seed study asked Qwen2-VL-72B:
# what the page is, what tells it, and every visible line of text. `可见文字` becomes the info file's `text`.
INFO_PAGE_TYPE_KEY = "页面类型"
INFO_CUES_KEY = "类型线索"
INFO_TEXT_KEY = "可见文字"
INFO_EXTRACTION_PROMPT = (
    "请仔细查看这张电商客服场景中的图片（手机截图或照片），提取其中的信息。\n"
    '只输出如下JSON：{"页面类型": "一句话说明这是什么页面或图片，如订单详情、退款进度、物流信息、商品详情、聊天记录、'
    '评价、实物照片", "类型线索": ["能说明页面类型的标题、按钮、状态文字或画面元素"], '
    '"可见文字": ["图中所有清晰可见的文字，按从上到下、从左到右的阅读顺序，每行一项"]}'
)
