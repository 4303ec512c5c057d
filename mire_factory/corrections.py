"""The corrections file: reviewed label changes (and reason fixes) per record id, applied by tools.convert.

One JSON object per line, one line per record id:

    {"id": "r17", "status": "accepted", "gold": "支付页面", "label": "物流页面-物流列表页面", "reason": null,
     "by": "alice", "why": "the screenshot shows a parcel list", "source": "analyze", "evidence": [...]}

- status: `suspected` (a tool's suggestion, not reviewed), `accepted` (apply it), `rejected` (keep the gold label).
- gold: the label the record had when it was suspected or reviewed; applying refuses a record whose label has
  changed since, so a correction is never applied to a label nobody looked at.
- label: the new label (a suspect's proposal); reason: an optional fixed teacher reason (tools.merge_cot uses it).
- by / why: who set the status and why; source: the tool that suggested it; evidence: what it saw (free form:
  teacher answers per mode, out-of-fold predictions), shown on the review page, never read by `apply`.

tools.analyze and tools.kfold write suspects; the review page (review_page.py) turns them into accepted or rejected
lines; tools.convert --corrections_file applies the accepted ones and records them in dataset_info.json.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from .io import MireInputError, OutputSet, problem, read_numbered_jsonl
from .records import MireRecord
from .taxonomy import LABELS, normalize_label

Status = Literal["suspected", "accepted", "rejected"]
STATUSES: tuple[str, ...] = ("suspected", "accepted", "rejected")
# Our key in a split's dataset_info.json entry: the corrections file and the corrections applied to that split.
CORRECTIONS_KEY = "mire_corrections"


@dataclass
class Correction:
    id: str
    status: Status
    gold: str  # the record's label when suspected or reviewed
    label: str  # the new (or proposed) label
    reason: str | None = None  # a fixed reason, for tools.merge_cot
    by: str = ""
    why: str = ""
    source: str = ""
    evidence: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def changes_label(self) -> bool:
        return self.label != self.gold


_TEXT = ("id", "status", "gold", "label", "by", "why", "source")
_FIELDS = set(_TEXT) | {"reason", "evidence"}


def _row_problem(row: dict) -> tuple[str, str] | None:
    for name in ("id", "status", "gold", "label"):
        if name not in row:
            return name, "missing field"
    for name in _TEXT:
        if name in row and not isinstance(row[name], str):
            return name, f"expected a string, got {type(row[name]).__name__}"
    if not row["id"]:
        return "id", "expected a non-empty string"
    if row["status"] not in STATUSES:
        return "status", f"expected one of {', '.join(STATUSES)}, got {row['status']!r}"
    if row.get("reason") is not None and not isinstance(row["reason"], str):
        return "reason", f"expected a string or null, got {type(row['reason']).__name__}"
    if "evidence" in row and not isinstance(row["evidence"], list):
        return "evidence", f"expected a list, got {type(row['evidence']).__name__}"
    unknown = sorted(set(row) - _FIELDS)
    if unknown:
        return unknown[0], "not a field of a corrections file"
    return None


def read_corrections(path: str | os.PathLike) -> list[Correction]:
    """Every line checked (fields, types, status, one line per id); all problems at once, one line each."""
    problems, out, seen = [], [], set()
    for lineno, row in read_numbered_jsonl(path):
        rid = row.get("id") if isinstance(row.get("id"), str) and row.get("id") else f"line {lineno}"
        found = _row_problem(row)
        if found:
            problems.append(problem(path, rid, found[0], f"line {lineno}: {found[1]}"))
            continue
        if row["id"] in seen:
            problems.append(problem(path, rid, "id", f"line {lineno}: a second line for this id"))
            continue
        seen.add(row["id"])
        out.append(Correction(**{k: row[k] for k in _FIELDS if k in row}))
    if problems:
        raise MireInputError(problems)
    if not out:
        raise MireInputError(problem(path, None, None, "no corrections (empty file)"))
    return out


@dataclass
class Applied:
    """What apply_corrections did: the accepted corrections (their label normalized), and the counts of the rest."""

    file: str
    accepted: list[Correction]
    counts: dict[str, int]

    def registration(self, ids: set[str]) -> dict:
        """The dataset_info.json value for a split holding `ids`: the file and that split's applied corrections."""
        rows = [{"id": c.id, "from": c.gold, "to": c.label, **({"reason": c.reason} if c.reason else {}),
                 "by": c.by, "why": c.why} for c in self.accepted if c.id in ids]
        return {"file": self.file, "applied": rows}

    def summary(self) -> str:
        changed = sum(c.changes_label for c in self.accepted)
        fixed = sum(c.reason is not None for c in self.accepted)
        return (f"corrections from {self.file}: {len(self.accepted)} accepted applied ({changed} label changes, "
                f"{fixed} reason fixes); {self.counts.get('rejected', 0)} rejected and "
                f"{self.counts.get('suspected', 0)} suspected left as they were")


def apply_corrections(records: list[MireRecord], corrections: list[Correction], file: str | os.PathLike
                      ) -> tuple[list[MireRecord], Applied]:
    """Records with the accepted labels in place (new objects; the input list is untouched). Every line must name a
    labelled record of the input whose label is still the line's `gold`, and carry a label of that record's task;
    otherwise MireInputError, one line per problem, before anything changes."""
    by_id = {r.id: r for r in records}
    problems, accepted = [], []
    for c in corrections:
        record = by_id.get(c.id)
        if record is None:
            problems.append(problem(file, c.id, "id", "no record with this id in the input file"))
            continue
        if record.output is None:
            problems.append(problem(file, c.id, "id", "the record has no gold label to correct (a test file?)"))
            continue
        gold, label = normalize_label(c.gold), normalize_label(c.label)
        if gold != record.output:
            problems.append(problem(file, c.id, "gold", f"{c.gold!r}, but the input file labels this record "
                                    f"{record.output!r}: the correction was reviewed against another label"))
            continue
        if label not in LABELS[record.task]:
            problems.append(problem(file, c.id, "label", f"{c.label!r} is not a label of the {record.task} task"))
            continue
        if c.status == "accepted":
            accepted.append(replace(c, gold=gold, label=label))
    if problems:
        raise MireInputError(problems)
    new = {c.id: c.label for c in accepted}
    out = [replace(r, output=new[r.id]) if r.id in new else r for r in records]
    return out, Applied(str(file), accepted, dict(Counter(c.status for c in corrections)))


def write_corrections(outs: OutputSet, path: str | os.PathLike, corrections: list[Correction]) -> Path:
    return outs.write_jsonl(path, (c.to_dict() for c in corrections))


def registered_reason_fixes(entry: dict) -> dict[str, tuple[str, str]]:
    """id -> (label, reason) of the applied corrections with a reason fix, from a split's dataset_info.json entry."""
    found = entry.get(CORRECTIONS_KEY) if isinstance(entry, dict) else None
    rows = found.get("applied", []) if isinstance(found, dict) else []
    return {row["id"]: (row["to"], row["reason"]) for row in rows
            if isinstance(row, dict) and isinstance(row.get("reason"), str) and row["reason"].strip()}
