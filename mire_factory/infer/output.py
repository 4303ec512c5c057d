"""The predictions JSONL: appended and flushed batch by batch, resumed by id, put in dataset order when complete."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..io import MireInputError, problem, write_jsonl_atomic


def read_done(path: str | os.PathLike) -> dict[str, dict]:
    """Rows already written, by id. A line cut off by a kill (the last one) is removed from the file."""
    path = Path(path)
    if not path.is_file():
        return {}
    raw = path.read_bytes()
    done: dict[str, dict] = {}
    good_end = 0
    pos = 0
    for line in raw.splitlines(keepends=True):
        pos += len(line)
        if not line.strip():
            good_end = pos
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if pos == len(raw) and not line.endswith(b"\n"):
                break  # a partial last line: rewritten below
            raise MireInputError(problem(path, None, None, f"broken line at byte {pos - len(line)}")) from None
        if not isinstance(row, dict) or not isinstance(row.get("id"), str):
            raise MireInputError(problem(path, None, "id", f"line at byte {pos - len(line)} has no id"))
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
