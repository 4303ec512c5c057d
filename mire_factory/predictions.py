"""Prediction files: reading them and pairing them with test records, by id (or, when asked, by position); the
answers are read by answers.py."""

from __future__ import annotations

import os
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from .answers import Answer, AnswerReport, extract_answer, read_answers
from .io import MireInputError, problem, read_jsonl
from .records import IMAGE_PLACEHOLDER, MireRecord
from .taxonomy import DIALOGUE_START, LABELS, TASKS, fix_label, normalize_label

SHOWN_IDS = 10  # error lines list at most this many ids, then a count


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
        if row.get("error") is not None and not isinstance(row["error"], str):
            problems.append(f"{file}: line {lineno}: field 'error': expected a string, got {type(row['error']).__name__}")
    if problems:
        raise MireInputError(problems)
    return rows


def _ids_text(ids: Sequence[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:SHOWN_IDS])
    return shown + (f" and {len(ids) - SHOWN_IDS} more" if len(ids) > SHOWN_IDS else "")


@dataclass
class Alignment:
    """Predictions in test-record order; `missing` and `duplicates` are only non-empty when filling was allowed.
    errors: why a row failed at inference (tools.vllm_infer's `error`, e.g. an undecodable image), else None."""

    texts: list[str | None]
    by_id: bool
    missing: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", unicodedata.normalize("NFKC", text))


_VISION_BLOCK = re.compile(r"<\|vision_start\|>.*?<\|vision_end\|>|<\|[a-z_]+\|>", re.S)


def _conversation_key(text: str) -> str:
    """The start of the conversation with images taken out, comparable between a record's instruction (`<image>`)
    and a rendered prompt (vision tokens, or nothing when decoded without special tokens)."""
    body = text.split(DIALOGUE_START, 1)[-1]
    return _squash(_VISION_BLOCK.sub("", body).replace(IMAGE_PLACEHOLDER, ""))[:32]


def _check_order(test_records: Sequence[MireRecord], rows: Sequence[dict], file) -> list[str]:
    """Pairing by position: a row whose prompt is of the other task or another conversation, whose answer is a label
    of the other task, or whose label differs from the record's gold, shows that the files are not in the same
    order. The first such row is named, then how many more there are."""
    problems = []
    for lineno, (record, row) in enumerate(zip(test_records, rows, strict=True), start=1):
        found = _order_problem(record, row, file, lineno)
        if found:
            problems.append(found)
    if len(problems) > 1:
        problems[1:] = [f"{file}: {len(problems) - 1} more rows disagree with the test records paired by position"]
    return problems


def _order_problem(record: MireRecord, row: dict, file, lineno: int) -> str | None:
    prompt = row.get("prompt")
    if isinstance(prompt, str) and prompt:
        # The dialogue tag is literal text of the official dialogue prompt only; a system prompt cannot fake it.
        prompt_task = "dialogue" if DIALOGUE_START in prompt else "image"
        if prompt_task != record.task:
            return (f"{file}: line {lineno}: field 'prompt': a {prompt_task} prompt paired by position with "
                    f"{record.task} record {record.id!r}; the files are not in the same order")
        if record.task == "dialogue":
            expected, found = _conversation_key(record.instruction), _conversation_key(prompt)
            n = min(len(expected), len(found))  # a prompt cut at cutoff_len keeps only the start
            if n >= 4 and expected[:n] != found[:n]:
                return (f"{file}: line {lineno}: field 'prompt': another conversation ({found[:16]!r}...) than record "
                        f"{record.id!r}'s ({expected[:16]!r}...); the files are not in the same order")
    answer = normalize_label(extract_answer(row.get("predict")))
    other = [t for t in TASKS if t != record.task and answer in LABELS[t] and answer not in LABELS[record.task]]
    if other:
        return (f"{file}: line {lineno}: field 'predict': {answer!r} is a {other[0]} label, paired by position with "
                f"{record.task} record {record.id!r}; the files are not in the same order")
    label = row.get("label")
    if record.output is not None and isinstance(label, str) and label.strip():
        if normalize_label(extract_answer(label)) != record.output:
            return (f"{file}: line {lineno}: field 'label': {label[:40]!r} paired by position with record "
                    f"{record.id!r} labelled {record.output!r}; the files are not in the same order")
    return None


def align(test_records: Sequence[MireRecord], rows: Sequence[dict], file, fill: bool = False,
          by_position: bool = False) -> Alignment:
    """Pairs rows with records by id. Rows without ids pair by position only when asked (`by_position`, the tools'
    --by_position), the counts match and nothing shows the order differs.

    Missing or duplicate ids raise MireInputError naming them unless `fill`; ids absent from the test file always do."""
    with_id = [row for row in rows if "id" in row]
    if not with_id:
        if not by_position:
            raise MireInputError(problem(
                file, None, "id", f"no ids: {len(rows)} predictions cannot be paired with the {len(test_records)} test "
                "records by id; pass --by_position to pair them by position (same count, same order)"))
        if len(rows) != len(test_records):
            raise MireInputError(
                problem(file, None, "id", f"no ids, and {len(rows)} predictions for {len(test_records)} test records: "
                        "cannot pair them by position (write predictions with ids, e.g. with tools.vllm_infer)")
            )
        problems = _check_order(test_records, rows, file)
        if problems:
            raise MireInputError(problems)
        return Alignment([row["predict"] for row in rows], by_id=False, errors=[row.get("error") for row in rows])
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
    first: dict[str, dict] = {}
    for row in rows:
        first.setdefault(row["id"], row)  # with --fill, a duplicate keeps its first prediction
    paired = [first.get(r.id) for r in test_records]
    return Alignment([row["predict"] if row else None for row in paired], by_id=True, missing=missing,
                     duplicates=duplicates, errors=[row.get("error") if row else None for row in paired])


def load_answers(
    test_records: Sequence[MireRecord], prediction_file: str | os.PathLike, fill: bool = False,
    by_position: bool = False,
) -> tuple[list[Answer], AnswerReport, Alignment]:
    """A prediction file read, paired with the test records and its answers read (answers.read_answer): one Answer
    per record, in their order. `fill` accepts missing or duplicate ids and fixes every invalid answer."""
    rows = read_predictions(prediction_file)
    alignment = align(test_records, rows, prediction_file, fill=fill, by_position=by_position)
    answers, report = read_answers(alignment.texts, [r.task for r in test_records], [r.id for r in test_records],
                                   fill=fill, errors=alignment.errors)
    return answers, report, alignment


def raw_texts(test_records: Sequence[MireRecord], alignment: Alignment) -> tuple[list[str], int]:
    """The strings as written, for scoring without reading them (cal_acc --raw): failed rows as written (usually
    empty), missing ones (only under --fill) the task's default label; and how many were missing."""
    out, missing = [], 0
    for text, record in zip(alignment.texts, test_records, strict=True):
        if text is None:
            text, _ = fix_label("", record.task)
            missing += 1
        out.append(text)
    return out, missing
