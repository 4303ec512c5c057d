"""The reasons JSONL schema: written by tools.distill, read by tools.analyze and tools.merge_cot."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Literal

from .io import MireInputError, read_numbered_jsonl

Status = Literal["ok", "refused", "failed"]
STATUSES: tuple[str, ...] = ("ok", "refused", "failed")


@dataclass
class ReasonRecord:
    id: str
    mode: int  # 1 free reasoning, 2 gold label + definitions, 3 as 2 with a length limit
    model: str
    status: Status
    reason: str | None = None
    label: str | None = None  # the teacher's label, parsed from the reply and normalized
    gold: str | None = None  # the record's gold label, when it had one
    task: str | None = None
    raw: str | None = None  # the reply text as received
    usage: dict = field(default_factory=dict)  # prompt_tokens, completion_tokens, total_tokens
    latency_s: float | None = None
    error: str | None = None  # why a failed or refused line did not succeed

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.id, self.mode, self.model)


_FIELDS = {f.name for f in fields(ReasonRecord)}


_TEXT_FIELDS = ("reason", "label", "gold", "task", "raw", "error")


def _type_problem(row: dict) -> tuple[str, str] | None:
    """(field, what is wrong) for the first field of the wrong type, else None."""
    if not isinstance(row["id"], str) or not row["id"]:
        return "id", f"expected a non-empty string, got {row['id']!r}"
    if not isinstance(row["model"], str):
        return "model", f"expected a string, got {type(row['model']).__name__}"
    for name in _TEXT_FIELDS:
        if row.get(name) is not None and not isinstance(row[name], str):
            return name, f"expected a string or null, got {type(row[name]).__name__}"
    usage = row.get("usage", {})
    if not isinstance(usage, dict) or not all(isinstance(v, int | float) and not isinstance(v, bool)
                                              for v in usage.values()):
        return "usage", "expected an object of token counts"
    latency = row.get("latency_s")
    if latency is not None and (not isinstance(latency, int | float) or isinstance(latency, bool)):
        return "latency_s", f"expected a number or null, got {type(latency).__name__}"
    return None


def reason_from_dict(row: dict, source: str | os.PathLike = "<reasons>", lineno: int | None = None) -> ReasonRecord:
    where = f"{source}: line {lineno}" if lineno else str(source)
    rid = row.get("id")
    for name in ("id", "mode", "model", "status"):
        if name not in row:
            raise MireInputError(f"{where}: record {rid!r}: field '{name}': missing field")
    if not isinstance(row["status"], str) or row["status"] not in STATUSES:
        raise MireInputError(f"{where}: record {rid!r}: field 'status': expected one of {STATUSES}, got {row['status']!r}")
    if not isinstance(row["mode"], int) or isinstance(row["mode"], bool) or row["mode"] not in (1, 2, 3):
        raise MireInputError(f"{where}: record {rid!r}: field 'mode': expected 1, 2 or 3, got {row['mode']!r}")
    wrong = _type_problem(row)
    if wrong is not None:
        raise MireInputError(f"{where}: record {rid!r}: field '{wrong[0]}': {wrong[1]}")
    return ReasonRecord(**{k: v for k, v in row.items() if k in _FIELDS})


def load_reasons(path: str | os.PathLike) -> list[ReasonRecord]:
    return [reason for _, reason in load_numbered_reasons(path)]


def load_numbered_reasons(path: str | os.PathLike) -> list[tuple[int, ReasonRecord]]:
    """(line number in the file, reason) pairs, for errors that name the line."""
    return [(lineno, reason_from_dict(row, path, lineno)) for lineno, row in read_numbered_jsonl(path)]
