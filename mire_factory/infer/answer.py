"""What a constrained answer may be, per record: the labels of its task, as a plain label or inside CoT JSON."""

from __future__ import annotations

from ..prompt_variants import AnswerFormat
from ..taxonomy import LABELS, Task
from .constrained import Grammar, LabelTrie, Path, answer_regex, cot_paths, label_paths, label_sequences


def answer_paths(task: Task, answer_format: AnswerFormat, label_position: str = "last") -> list[Path]:
    labels = LABELS[task]
    return cot_paths(labels, label_position) if answer_format == "cot" else label_paths(labels)


class AnswerConstraints:
    """Per-task tries (label format) or grammars (CoT format), built once and shared by every batch."""

    def __init__(self, tokenizer, stop_id: int, answer_format: AnswerFormat, label_position: str = "last"):
        self.answer_format = answer_format
        self.label_position = label_position
        self.tries = {t: LabelTrie(label_sequences(tokenizer, LABELS[t], stop_id)) for t in LABELS}
        self.grammars = {t: Grammar(answer_paths(t, "cot", label_position)) for t in LABELS}


def reason_chars(task: Task, max_new_tokens: int, label_position: str = "last") -> int:
    """The longest CoT reason, in characters, that vLLM's regex allows, so that the JSON always closes within
    max_new_tokens: the fixed text may come one token per byte, the reason at least one character per token.

    A regex cannot count tokens (the hf backend's grammar does: it ends the reason when the budget runs out).
    """
    fixed = max(len((p.a + p.b).encode()) for p in answer_paths(task, "cot", label_position))
    return max(0, max_new_tokens - 1 - fixed)


def guided_decoding(task: Task, answer_format: AnswerFormat, label_position: str = "last",
                    max_new_tokens: int = 100, max_reason_chars: int | None = None) -> dict:
    """vLLM structured-outputs fields (StructuredOutputsParams): a choice among the task's labels, or a regex for
    the CoT JSON whose reason is at most max_reason_chars long (default reason_chars(): always closes in time)."""
    if answer_format == "label":
        return {"choice": list(LABELS[task])}
    paths = answer_paths(task, "cot", label_position)
    if max_reason_chars is None:
        max_reason_chars = reason_chars(task, max_new_tokens, label_position)
    return {"regex": answer_regex(paths, max_reason_chars)}
