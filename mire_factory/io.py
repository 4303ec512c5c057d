"""Atomic writes and the one-line input errors every tool reports with exit code 2."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

EXIT_BAD_INPUT = 2


class MireInputError(Exception):
    """Bad input: each line names the file, the record (id or index) and the field."""

    def __init__(self, lines: str | list[str]):
        self.lines = [lines] if isinstance(lines, str) else list(lines)
        super().__init__("\n".join(self.lines))


def problem(file: str | os.PathLike, record: str | int | None, field: str | None, message: str) -> str:
    where = f"record {record!r}" if isinstance(record, str) else f"record #{record}" if record is not None else ""
    parts = [str(file)]
    if where:
        parts.append(where)
    if field:
        parts.append(f"field '{field}'")
    return ": ".join(parts) + f": {message}"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temp path beside `path`; renamed onto it only when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise MireInputError(problem(path, None, None, "file not found"))
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MireInputError(problem(path, None, None, f"not valid JSON ({exc})")) from None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """JSON lines; a blank trailing line is fine, a broken line is an error naming its line number."""
    return [row for _, row in read_numbered_jsonl(path)]


def read_numbered_jsonl(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """read_jsonl with each object's line number in the file."""
    path = Path(path)
    if not path.is_file():
        raise MireInputError(problem(path, None, None, "file not found"))
    return numbered_jsonl(path.read_text(encoding="utf-8-sig"), path)


def numbered_jsonl(text: str, path: str | os.PathLike) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of JSON-lines text; a broken line is an error naming `path` and
    its line number, and so can later checks."""
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MireInputError(f"{path}: line {lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise MireInputError(f"{path}: line {lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append((lineno, row))
    return rows


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Runs a tool's main; bad input prints its one-line errors to stderr and exits 2."""
    try:
        code = main(argv)
    except MireInputError as exc:
        for line in exc.lines:
            print(f"error: {line}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    sys.exit(code or 0)
