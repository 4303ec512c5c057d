"""The predictions JSONL: appended and flushed batch by batch, resumed by id, put in dataset order when complete."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..io import MireInputError, output_lock, write_jsonl_atomic

_ID_IN_LINE = re.compile(rb'^\{"id": "((?:[^"\\]|\\.)*)"')


def read_done(path: str | os.PathLike) -> dict[str, dict]:
    """Rows already written, by id. A line cut off by a kill (the last one) is removed from the file."""
    path = Path(path)
    if not path.is_file():
        return {}
    raw = path.read_bytes()
    done: dict[str, dict] = {}
    good_end = 0
    pos = 0
    for lineno, line in enumerate(raw.splitlines(keepends=True), start=1):
        pos += len(line)
        if not line.strip():
            good_end = pos
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            if pos == len(raw) and not line.endswith(b"\n"):
                break  # a partial last line: rewritten below
            rid = _ID_IN_LINE.search(line)
            record = f"record {rid.group(1).decode('utf-8', 'replace')!r}: " if rid else ""
            why = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
            raise MireInputError(f"{path}: line {lineno}: {record}not valid JSON ({why}); fix or remove the line, "
                                 "then rerun to predict it again") from None
        if not isinstance(row, dict) or not isinstance(row.get("id"), str):
            raise MireInputError(f"{path}: line {lineno}: field 'id': missing; not a predictions line of ours")
        done[row["id"]] = row
        good_end = pos
    if good_end < len(raw):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return done


class Appender:
    def __init__(self, path: str | os.PathLike):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", encoding="utf-8")

    def write(self, rows: list[dict]) -> None:
        self.file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def finalize(path: str | os.PathLike, ordered_ids: list[str]) -> bool:
    """Rewrites the file in dataset order once every id is in it; False (file untouched) when some are missing."""
    done = read_done(path)
    if any(rid not in done for rid in ordered_ids):
        return False
    write_jsonl_atomic(path, [done[rid] for rid in ordered_ids])
    return True


def lock_predictions(path: str | os.PathLike):
    """The exclusive lock of a predictions file for a whole run (read, append, finalize): a second run on the same
    file is refused with one line, exit 2, instead of predicting everything twice."""
    return output_lock(path, what="another tools.vllm_infer is writing it")
