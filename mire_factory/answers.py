"""Model answers to labels: raw text -> (a valid label of the record's task, or None; how). The one reader of answers,
used by tools.cal_acc, tools.convert2submit, tools.vote and the F1 callback.

Policy, by taxonomy.match_label's evidence:
- a label up to spacing, quotes, bracket width, trailing punctuation or a "标签：" prefix: the label;
- CoT JSON (`{"理由": ..., "所属类别": ...}`, fenced, single-quoted or cut off): the label it names, read as above;
- near misses are fixed: the text contains a label (padded), is its first characters (truncated, >= 2), or matches
  at least two thirds of the characters of one label in order, and that label more than any other (difflib ratio
  >= SIMILAR_MIN; a single wrong, missing or extra character in a label of 3 or more characters);
- everything else stays invalid (label None): empty answers, a label of the other task, garbage. Scored as the
  official tool scores it (the string is the prediction, which matches no gold). Under per-task weighted F1 a wrong
  valid label also costs the precision of the class it lands in, so guessing a default scores lower than leaving
  the answer invalid (BENCHMARKS.md: "Answers");
- `fill` (the tools' --fill) is the old fix-everything rule: every invalid answer gets the nearest label, a missing or
  failed prediction the task's default.
"""

from __future__ import annotations

import ast
import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from .prompts import LABEL_KEY, REASON_KEY
from .taxonomy import LABELS, TASKS, Task, label_similarities, match_label, normalize_label

# Keys a JSON answer may carry its label under, most specific first.
ANSWER_KEYS: tuple[str, ...] = (LABEL_KEY, "label", "分类标签", "类别", "标签", "answer")
# Measured on single-character edits of every label against garbage answers (benchmarks/answers.py): one edit in a
# label of >= 3 characters scores >= 2/3; below it, 2-character labels with one character wrong and pieces of other
# text. 2/3 also reads as "two thirds of the characters match, in order".
SIMILAR_MIN = 2 / 3
INVALID = "(invalid)"  # what an invalid answer is scored as: a class no gold has (the same figures as the raw text)

# How an answer was read. Valid: exact, normalized, contained, truncated, similar, filled. Invalid: the rest.
FIXED_HOWS = ("contained", "truncated", "similar")
INVALID_HOWS = ("empty", "unmatched", "other_task", "missing", "failed")


def is_strict_answer(text: str, task: str, answer_format: str) -> bool:
    """The answer exactly as constrained decoding must write it, no repair: a label of the task ("label"), or a JSON
    object with exactly the keys 理由 and 所属类别, the latter a label of the task ("cot"). What the validity counts
    of `--constrained` (benchmarks) measure; scoring reads answers leniently (read_answer)."""
    if answer_format == "label":
        return text in LABELS[task]
    try:
        obj = json.loads(text)
    except ValueError:
        return False
    return isinstance(obj, dict) and set(obj) == {REASON_KEY, LABEL_KEY} and obj[LABEL_KEY] in LABELS[task]

_FENCE = re.compile(r"```[a-zA-Z]*\s*|```")
_KEY_ALTERNATION = "|".join(re.escape(k) for k in ANSWER_KEYS)
# For answers JSON cannot parse (truncated, unescaped quotes): `"所属类别": "label` up to a closing quote or the end.
_QUOTED_VALUE = re.compile(rf"[\"']?(?:{_KEY_ALTERNATION})[\"']?\s*[:：]\s*([\"'])(.*?)(?:\1|$)", re.S)
_BARE_VALUE = re.compile(rf"[\"']?(?:{_KEY_ALTERNATION})[\"']?\s*[:：]\s*([^\"'\n,，}}]+)")


def _label_from_mapping(obj: object) -> str | None:
    if isinstance(obj, dict):
        for key in ANSWER_KEYS:
            value = obj.get(key)
            if isinstance(value, list) and len(value) == 1:
                value = value[0]
            if isinstance(value, str) and value.strip():
                return value.strip()
    return None


def _parse_object(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(text)  # single-quoted dicts, as some models write them
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None


def extract_answer(text: object) -> str:
    """The label a CoT JSON answer names (`所属类别`, also `label`); otherwise the text itself, stripped.

    Tolerates code fences, text before or after the JSON, single quotes and answers cut off mid-JSON."""
    if not isinstance(text, str):
        return ""
    stripped = text.strip()
    if not any(key in stripped for key in ANSWER_KEYS):
        return stripped
    body = _FENCE.sub("", stripped).strip()
    decoder = json.JSONDecoder()
    for start in [m.start() for m in re.finditer(r"\{", body)]:
        try:
            obj, _ = decoder.raw_decode(body[start:])
        except json.JSONDecodeError:
            end = body.find("}", start)
            obj = _parse_object(body[start : end + 1]) if end != -1 else None
        label = _label_from_mapping(obj)
        if label is not None:
            return label
    for pattern in (_QUOTED_VALUE, _BARE_VALUE):
        match = pattern.search(body)
        if match:
            value = match.group(match.lastindex).strip()
            if value:
                return value
    return stripped


@dataclass(frozen=True)
class Answer:
    label: str | None  # a valid label of the task, or None (invalid)
    how: str  # exact, normalized, contained, truncated, similar, filled | empty, unmatched, other_task, missing, failed
    text: str  # the answer as read (the label named by CoT JSON, else the stripped text)
    from_json: bool = False

    @property
    def scored(self) -> str:
        """What the official metric compares with the gold: the label, or a string no gold has."""
        return self.label if self.label is not None else INVALID


def read_answer(raw: str | None, task: Task, fill: bool = False, error: str | None = None) -> Answer:
    """One answer. raw None: no prediction for the record; error: the prediction failed (e.g. its image)."""
    if raw is None or error:
        how = "failed" if error else "missing"
        return _filled(Answer(None, how, ""), task) if fill else Answer(None, how, "")
    text = extract_answer(raw)
    from_json = text != raw.strip()
    canonical = normalize_label(text)
    if canonical in LABELS[task]:
        return Answer(canonical, "exact" if canonical == text else "normalized", text, from_json)
    other = [t for t in TASKS if t != task and canonical in LABELS[t]]
    label, evidence, score = match_label(text, task)
    if other:
        answer = Answer(None, "other_task", text, from_json)
    elif evidence in ("contained", "truncated") or (evidence == "similar" and _clearly_nearest(text, task)):
        return Answer(label, evidence, text, from_json)
    else:
        answer = Answer(None, "empty" if evidence == "empty" else "unmatched", text, from_json)
    return _filled(answer, task) if fill else answer


def _clearly_nearest(text: str, task: Task) -> bool:
    """Similar enough to one label, and more similar to it than to any other (退叒页面 is as near 退款页面 as 退货页面)."""
    ranked = label_similarities(text, task)
    return ranked[0][1] >= SIMILAR_MIN and (len(ranked) == 1 or ranked[1][1] < ranked[0][1])


def _filled(answer: Answer, task: Task) -> Answer:
    label, _, _ = match_label(answer.text, task)
    return Answer(label, "filled", answer.text, answer.from_json)


@dataclass
class AnswerReport:
    """How a file's answers were read: parsed, normalized, fixed, left invalid or filled; for the tools' output."""

    total: int = 0
    from_json: int = 0
    hows: Counter = field(default_factory=Counter)  # how -> count
    fixed: Counter = field(default_factory=Counter)  # (task, label) -> near misses fixed to it
    filled: Counter = field(default_factory=Counter)  # (task, how it was invalid, label) -> count (fill)
    examples: list[tuple[str, str, str, str]] = field(default_factory=list)  # (id, raw, how, result)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (id, error) of failed predictions

    def add(self, rid: str, raw: str | None, task: Task, answer: Answer, was: str | None = None) -> None:
        self.total += 1
        self.from_json += answer.from_json
        self.hows[answer.how] += 1
        if answer.how in FIXED_HOWS:
            self.fixed[(task, answer.label)] += 1
        if answer.how == "filled":
            self.filled[(task, was or "", answer.label)] += 1
        if answer.how not in ("exact", "normalized") and len(self.examples) < 50:
            self.examples.append((rid, raw or "", answer.how, answer.label or answer.text))

    @property
    def n_fixed(self) -> int:
        return sum(self.hows[h] for h in FIXED_HOWS)

    @property
    def n_invalid(self) -> int:
        return sum(self.hows[h] for h in INVALID_HOWS)

    def lines(self) -> list[str]:
        h = self.hows
        invalid = ", ".join(f"{how.replace('_', ' ')} {h[how]}" for how in INVALID_HOWS if h[how])
        out = [
            f"labels: {self.total} predictions, {self.from_json} parsed from CoT JSON, {h['normalized']} normalized, "
            f"{self.n_fixed} near misses fixed, {self.n_invalid} left invalid" + (f" ({invalid})" if invalid else "")
            + (f", {h['filled']} filled with the nearest label (--fill)" if h["filled"] else "")
        ]
        for (task, label), n in sorted(self.fixed.items(), key=lambda kv: (-kv[1], kv[0])):
            out.append(f"  fixed -> [{task}] {label}: {n}")
        for (task, was, label), n in sorted(self.filled.items(), key=lambda kv: (-kv[1], kv[0])):
            out.append(f"  filled ({was}) -> [{task}] {label}: {n}")
        if self.failures:
            rid, error = self.failures[0]
            out.append(f"  {len(self.failures)} predictions failed at inference, e.g. {rid}: {error}")
        for rid, raw, how, result in self.examples[:5]:
            out.append(f"  e.g. {rid}: {raw[:60]!r} -> {how}: {result[:40]!r}")
        return out


def read_answers(
    texts: Sequence[str | None],
    tasks: Sequence[Task],
    ids: Sequence[str],
    fill: bool = False,
    errors: Sequence[str | None] | None = None,
) -> tuple[list[Answer], AnswerReport]:
    """read_answer over a file's predictions in record order, with the report of how they were read."""
    report = AnswerReport()
    answers = []
    errors = errors or [None] * len(texts)
    for rid, text, task, error in zip(ids, texts, tasks, errors, strict=True):
        answer = read_answer(text, task, fill=fill, error=error)
        was = read_answer(text, task, error=error).how if answer.how == "filled" else None
        report.add(rid, text, task, answer, was)
        if error:
            report.failures.append((rid, error))
        answers.append(answer)
    return answers, report
