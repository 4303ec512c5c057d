"""Prediction files: reading them, pulling the label out of CoT answers, pairing them with test records by id, and
fixing invalid labels to the nearest valid label of the record's own task."""

from __future__ import annotations

import ast
import json
import os
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from .io import MireInputError, problem, read_jsonl
from .prompts import LABEL_KEY
from .records import IMAGE_PLACEHOLDER, MireRecord
from .taxonomy import DIALOGUE_START, LABELS, Task, fix_label, normalize_label

# Keys a JSON answer may carry its label under, most specific first.
ANSWER_KEYS: tuple[str, ...] = (LABEL_KEY, "label", "分类标签", "类别", "标签", "answer")
_FENCE = re.compile(r"```[a-zA-Z]*\s*|```")
_KEY_ALTERNATION = "|".join(re.escape(k) for k in ANSWER_KEYS)
# For answers JSON cannot parse (truncated, unescaped quotes): `"所属类别": "label` up to a closing quote or the end.
_QUOTED_VALUE = re.compile(rf"[\"']?(?:{_KEY_ALTERNATION})[\"']?\s*[:：]\s*([\"'])(.*?)(?:\1|$)", re.S)
_BARE_VALUE = re.compile(rf"[\"']?(?:{_KEY_ALTERNATION})[\"']?\s*[:：]\s*([^\"'\n,，}}]+)")
SHOWN_IDS = 10  # error lines list at most this many ids, then a count


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


def read_predictions(file: str | os.PathLike) -> list[dict]:
    """Rows of a prediction JSONL (LLaMA-Factory's generated_predictions.jsonl, or ours with `id`)."""
    rows = read_jsonl(file)
    if not rows:
        raise MireInputError(problem(file, None, None, "no predictions (empty file)"))
    problems = []
    for lineno, row in enumerate(rows, start=1):
        if "predict" not in row:
            problems.append(f"{file}: line {lineno}: field 'predict': missing field")
        elif not isinstance(row["predict"], str):
            problems.append(f"{file}: line {lineno}: field 'predict': expected a string, got {type(row['predict']).__name__}")
        if "id" in row and (not isinstance(row["id"], str) or not row["id"]):
            problems.append(f"{file}: line {lineno}: field 'id': expected a non-empty string, got {row['id']!r}")
    if problems:
        raise MireInputError(problems)
    return rows


def _ids_text(ids: Sequence[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:SHOWN_IDS])
    return shown + (f" and {len(ids) - SHOWN_IDS} more" if len(ids) > SHOWN_IDS else "")


@dataclass
class Alignment:
    """Predictions in test-record order; `missing` and `duplicates` are only non-empty when filling was allowed."""

    texts: list[str | None]
    by_id: bool
    missing: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", unicodedata.normalize("NFKC", text))


_VISION_BLOCK = re.compile(r"<\|vision_start\|>.*?<\|vision_end\|>|<\|[a-z_]+\|>", re.S)


def _conversation_key(text: str) -> str:
    """The start of the conversation with images taken out, comparable between a record's instruction (`<image>`)
    and a rendered prompt (vision tokens, or nothing when decoded without special tokens)."""
    body = text.split(DIALOGUE_START, 1)[-1]
    return _squash(_VISION_BLOCK.sub("", body).replace(IMAGE_PLACEHOLDER, ""))[:32]


def _check_order(test_records: Sequence[MireRecord], rows: Sequence[dict], file) -> list[str]:
    """Pairing by position: a row whose prompt is of the other task or another conversation, or whose label differs
    from the record's gold, shows that the files are not in the same order."""
    problems = []
    for lineno, (record, row) in enumerate(zip(test_records, rows, strict=True), start=1):
        prompt = row.get("prompt")
        if isinstance(prompt, str) and prompt:
            # The dialogue tag is literal text of the official dialogue prompt only; a system prompt cannot fake it.
            prompt_task = "dialogue" if DIALOGUE_START in prompt else "image"
            if prompt_task != record.task:
                problems.append(
                    f"{file}: line {lineno}: field 'prompt': a {prompt_task} prompt paired by position with "
                    f"{record.task} record {record.id!r}; the files are not in the same order"
                )
                continue
            if record.task == "dialogue":
                expected, found = _conversation_key(record.instruction), _conversation_key(prompt)
                n = min(len(expected), len(found))  # a prompt cut at cutoff_len keeps only the start
                if n >= 4 and expected[:n] != found[:n]:
                    problems.append(
                        f"{file}: line {lineno}: field 'prompt': another conversation ({found[:16]!r}...) than record "
                        f"{record.id!r}'s ({expected[:16]!r}...); the files are not in the same order"
                    )
                    continue
        label = row.get("label")
        if record.output is not None and isinstance(label, str) and label.strip():
            if normalize_label(extract_answer(label)) != record.output:
                problems.append(
                    f"{file}: line {lineno}: field 'label': {label[:40]!r} paired by position with record "
                    f"{record.id!r} labelled {record.output!r}; the files are not in the same order"
                )
    return problems


def align(test_records: Sequence[MireRecord], rows: Sequence[dict], file, fill: bool = False) -> Alignment:
    """Pairs rows with records by id; by position only when no row has an id and the counts match.

    Missing or duplicate ids raise MireInputError naming them unless `fill`; ids absent from the test file always do."""
    with_id = [row for row in rows if "id" in row]
    if not with_id:
        if len(rows) != len(test_records):
            raise MireInputError(
                problem(file, None, "id", f"no ids, and {len(rows)} predictions for {len(test_records)} test records: "
                        "cannot pair them by position (write predictions with ids, e.g. with tools.predict)")
            )
        problems = _check_order(test_records, rows, file)
        if problems:
            raise MireInputError(problems)
        print(f"warning: {file}: predictions carry no ids; paired with the test records by position", file=sys.stderr)
        return Alignment([row["predict"] for row in rows], by_id=False)
    if len(with_id) != len(rows):
        lines = [n for n, row in enumerate(rows, start=1) if "id" not in row]
        raise MireInputError(problem(file, None, "id", f"missing on lines {lines[:SHOWN_IDS]} while other lines have ids"))
    test_ids = {r.id for r in test_records}
    counts = Counter(row["id"] for row in rows)
    unknown = [i for i in counts if i not in test_ids]
    duplicates = [i for i, n in counts.items() if n > 1]
    missing = [r.id for r in test_records if r.id not in counts]
    problems = []
    if unknown:
        problems.append(problem(file, None, "id", f"{len(unknown)} ids not in the test file: {_ids_text(unknown)}"))
    if duplicates and not fill:
        problems.append(problem(file, None, "id", f"{len(duplicates)} ids predicted more than once: {_ids_text(duplicates)}"))
    if missing and not fill:
        problems.append(problem(file, None, "id", f"{len(missing)} test ids without a prediction: {_ids_text(missing)}"))
    if problems:
        raise MireInputError(problems)
    first: dict[str, str] = {}
    for row in rows:
        first.setdefault(row["id"], row["predict"])  # with --fill, a duplicate keeps its first prediction
    return Alignment([first.get(r.id) for r in test_records], by_id=True, missing=missing, duplicates=duplicates)


def align_predictions(test_records: Sequence[MireRecord], prediction_rows: Sequence[dict], file) -> list[str]:
    """The prediction text for every test record, in the records' order (strict: no missing or duplicate ids)."""
    return align(test_records, prediction_rows, file).texts  # type: ignore[return-value]


@dataclass
class FixReport:
    """How raw prediction texts became labels: CoT answers parsed, spellings normalized, invalid labels fixed."""

    total: int = 0
    cot_parsed: int = 0
    normalized: int = 0
    fixed: Counter = field(default_factory=Counter)  # (task, label it was fixed to) -> count
    filled: Counter = field(default_factory=Counter)  # (task, default label) -> count of missing predictions
    examples: list[tuple[str, str, str]] = field(default_factory=list)  # (record id, raw text, fixed label)

    @property
    def n_fixed(self) -> int:
        return sum(self.fixed.values())

    def lines(self) -> list[str]:
        out = [
            f"labels: {self.total} predictions, {self.cot_parsed} parsed from CoT JSON, {self.normalized} normalized, "
            f"{self.n_fixed} invalid fixed to the nearest label, {sum(self.filled.values())} missing filled"
        ]
        for (task, label), n in sorted(self.fixed.items(), key=lambda kv: (-kv[1], kv[0])):
            out.append(f"  fixed -> [{task}] {label}: {n}")
        for (task, label), n in sorted(self.filled.items()):
            out.append(f"  filled -> [{task}] {label}: {n}")
        for rid, raw, label in self.examples[:5]:
            out.append(f"  e.g. {rid}: {raw[:60]!r} -> {label}")
        return out


def fix_predictions(
    texts: Sequence[str | None], tasks: Sequence[Task], ids: Sequence[str] | None = None
) -> tuple[list[str], FixReport]:
    """Every text as a valid label of its record's task: CoT answers parsed, then taxonomy.fix_label.

    A None text (a prediction missing under --fill) becomes the task's default, fix_label's answer to nothing."""
    report = FixReport(total=len(texts))
    labels = []
    for pos, (text, task) in enumerate(zip(texts, tasks, strict=True)):
        rid = ids[pos] if ids is not None else f"#{pos}"
        if text is None:
            label, _ = fix_label("", task)
            report.filled[(task, label)] += 1
            labels.append(label)
            continue
        answer = extract_answer(text)
        if answer != text.strip():
            report.cot_parsed += 1
        canonical = normalize_label(answer)
        if canonical in LABELS[task]:
            if canonical != answer:
                report.normalized += 1
            labels.append(canonical)
            continue
        label, _ = fix_label(answer, task)
        report.fixed[(task, label)] += 1
        report.examples.append((rid, text, label))
        labels.append(label)
    return labels, report


def load_labels(
    test_records: Sequence[MireRecord], prediction_file: str | os.PathLike, fill: bool = False, raw: bool = False
) -> tuple[list[str], FixReport, Alignment]:
    """A prediction file read, paired with the test records and fixed: one label per record, in their order.

    `raw` keeps the texts exactly as written (the official tools' behaviour); `fill` accepts missing or duplicate
    ids, the missing ones becoming the task's default label."""
    rows = read_predictions(prediction_file)
    alignment = align(test_records, rows, prediction_file, fill=fill)
    if raw:
        report = FixReport(total=len(test_records))
        labels = []
        for text, record in zip(alignment.texts, test_records, strict=True):
            if text is None:
                text, _ = fix_label("", record.task)
                report.filled[(record.task, text)] += 1
            labels.append(text)
        return labels, report, alignment
    labels, report = fix_predictions(alignment.texts, [r.task for r in test_records], [r.id for r in test_records])
    return labels, report, alignment
