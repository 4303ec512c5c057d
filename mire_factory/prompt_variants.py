"""Prompt variants: how a record's user turn and its answer are written. One named choice per dataset, made once.

Registered the way LLaMA-Factory registers chat templates (`register_prompt_variant`, looked up by name). The chat
format itself stays LLaMA-Factory's `qwen2_vl` template; a variant only decides the text inside the turns.

Where a variant is chosen and read back:
- `tools.convert --prompt_variant NAME` writes every split (train, val, test) with it and records NAME in the
  split's registration in dataset_info.json, under `mire_prompt_variant` (LLaMA-Factory reads only the keys it knows
  from an entry, so training is unaffected).
- `tools.merge_cot` requires a CoT variant on its input file and writes reasons in that variant's answer format
  (`--layout inline`), or a label variant, whose bare label it follows with the reason as a second exchange
  (`--layout second_turn`; inference asks only the first). The output keeps the input's variant.
- `tools.vllm_infer` renders the dataset file as written (token-identical to training), and takes the answer
  format for constrained decoding from the dataset's variant; it refuses a model trained with another variant.
- The F1 callback generates from the validation prompts LLaMA-Factory tokenized from the same files.

A variant that inserts per-record text registers a `context` name; `tools.convert` then needs that text for every
record and puts it in ONE place, `user_turn`'s `context`: on a new line after the record's own content (instruction,
then input), before the variant's suffix. Every split gets it the same way, so train and test prompts stay identical.
The one such context today is SCREENSHOT_TEXT: the text of the record's images from an info file of
tools.extract_info (`tools.convert --info_file`), rendered by mire_factory/screenshot_text.py within a token budget
(`--info_max_tokens`); a record without images gets none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .prompts import cot_user_suffix, format_cot_answer
from .taxonomy import Task

AnswerFormat = Literal["label", "cot"]
LabelPosition = Literal["last", "first"]
DEFAULT_PROMPT_VARIANT = "plain"
SCREENSHOT_TEXT = "screenshot_text"  # the context of the screenshot-text variants (mire_factory/screenshot_text.py)


@dataclass(frozen=True)
class PromptVariant:
    name: str
    answer_format: AnswerFormat  # label: the bare label; cot: JSON {"理由", "所属类别"}
    label_position: LabelPosition = "last"  # cot: the label key after the reason (last) or before it (first)
    context: str | None = None  # name of per-record text the variant inserts (None: the record alone)
    description: str = ""

    def user_suffix(self, task: Task) -> str:
        """Text after the record's content: for CoT, every label's definition and the answer format."""
        return cot_user_suffix(task, self.label_position) if self.answer_format == "cot" else ""

    def user_turn(self, content: str, task: Task, context: str | None = None) -> str:
        """The user turn: the record's content (instruction + input, <image> placeholders in place), the variant's
        per-record context text if it has one (on a new line; "" for a record that has none), then its suffix."""
        if self.context and context is None:
            raise ValueError(f"prompt variant {self.name!r} needs the record's {self.context}")
        return content + (f"\n{context}" if self.context and context else "") + self.user_suffix(task)

    def answer(self, label: str, reason: str = "") -> str:
        """The assistant turn for a gold label (and a teacher's reason, for CoT)."""
        return format_cot_answer(reason, label, self.label_position) if self.answer_format == "cot" else label


PROMPT_VARIANTS: dict[str, PromptVariant] = {}


def register_prompt_variant(variant: PromptVariant) -> PromptVariant:
    if variant.name in PROMPT_VARIANTS:
        raise ValueError(f"prompt variant {variant.name!r} is already registered")
    PROMPT_VARIANTS[variant.name] = variant
    return variant


def get_prompt_variant(name: str | None) -> PromptVariant:
    """The registered variant; None is the default (plain). ValueError names the choices."""
    name = name or DEFAULT_PROMPT_VARIANT
    if name not in PROMPT_VARIANTS:
        raise ValueError(f"unknown prompt variant {name!r} (registered: {', '.join(PROMPT_VARIANTS)})")
    return PROMPT_VARIANTS[name]


register_prompt_variant(PromptVariant(
    "plain", "label", description="the official instruction; the answer is the bare label (the official baseline)"))
register_prompt_variant(PromptVariant(
    "cot", "cot", "last",
    description="the instruction plus every label's definition and a JSON answer format; answer "
                '{"理由": reason, "所属类别": label} (data from tools.merge_cot)'))
register_prompt_variant(PromptVariant(
    "cot_label_first", "cot", "first",
    description='as cot with the label key first: {"所属类别": label, "理由": reason}'))
register_prompt_variant(PromptVariant(
    "screenshot_text", "label", context=SCREENSHOT_TEXT,
    description="as plain, with the text of the record's images (tools.convert --info_file: OCR or a teacher's, "
                "from tools.extract_info) after the instruction, within --info_max_tokens"))
register_prompt_variant(PromptVariant(
    "screenshot_text_cot", "cot", "last", context=SCREENSHOT_TEXT,
    description="as cot, with the screenshot text of screenshot_text between the instruction and the definitions"))
