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


def guided_decoding(task: Task, answer_format: AnswerFormat, label_position: str = "last") -> dict:
    """vLLM guided-decoding fields: a choice among the task's labels, or a regex for the CoT JSON."""
    if answer_format == "label":
        return {"choice": list(LABELS[task])}
    return {"regex": answer_regex(answer_paths(task, "cot", label_position))}
