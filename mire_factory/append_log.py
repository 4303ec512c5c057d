"""Append-only JSON-lines logs that long jobs resume from: reasons of tools.distill (distill.ReasonsLog), info files of
tools.extract_info and tools.generate (image_info.InfoLog), predictions of tools.vllm_infer (infer.output.PredictionsLog).

Each line is written with a single write() and fsync'd by a group-commit thread, so a kill loses at most the work in
flight, never a finished result. Every line records the work of one key; a later line of a key supersedes an earlier
one. Loading repairs a last line cut by a kill, and refuses (before anything changes) a file that is not a log of this
kind: a tool appends only to its own files, or to a new or empty one. One writer at a time: the output's lock
(io.output_lock, filelock) refuses a second run at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import Generic, TypeVar

from .io import MireInputError, numbered_jsonl, output_lock, problem, write_text_atomic

T = TypeVar("T")

_FIRST_KEY = re.compile(r'^\{"(\w+)": "((?:[^"\\]|\\.)*)"')


class AppendLog(Generic[T]):
    """Subclasses set `line_start` (how every line begins: the first key of the row's JSON), `kind` (e.g. "a
    reasons file of tools.distill"), `hint` (what to do instead), `writer` (the tool, for a refused second run), and
    define `parse(row, lineno)` (a row, or MireInputError naming the line), `key(row)` and `dump(row)` (its line)."""

    line_start: bytes = b"{"
    kind: str = "a log"
    hint: str = "choose another --output_file"
    writer: str = "run"

    def __init__(self, path: str | os.PathLike, writer: str | None = None):
        self.path = Path(path)
        self.writer = writer or self.writer
        self.repaired_bytes = 0
        self._fd: int | None = None

    def parse(self, row: dict, lineno: int) -> T:
        raise NotImplementedError

    def key(self, row: T) -> Hashable:
        raise NotImplementedError

    def dump(self, row: T) -> str:
        raise NotImplementedError

    # ---------------------------------------------------------------- reading

    def load(self, repair: bool = True) -> list[T]:
        """The file's rows in line order. `repair` cuts an unfinished last line left by a kill."""
        if not self.path.exists():
            return []
        if self.path.is_dir():
            raise MireInputError(problem(self.path, None, None, f"is a directory, expected {self.kind}"))
        data = self.path.read_bytes()
        keep = data.rfind(b"\n") + 1 if data and not data.endswith(b"\n") else len(data)
        tail = data[keep:]
        # A kill during write() can only leave the start of one of our lines, which all begin the same way.
        if tail and not (tail.startswith(self.line_start) or self.line_start.startswith(tail)):
            raise self.not_ours(f"its last line ({len(tail)} bytes) is not a line of ours cut by a kill")
        try:
            text = data[:keep].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.not_ours(f"not UTF-8 text at byte {exc.start}") from None
        rows = [row for _, _, row in self._lines(text)]
        if tail and repair:
            self.repaired_bytes = len(tail)
            os.truncate(self.path, keep)
        return rows

    def latest(self, rows: list[T] | None = None) -> dict[Hashable, T]:
        """The last row of each key (of `rows`, default the file's, repaired), in the order keys first appear."""
        out: dict[Hashable, T] = {}
        for row in self.load() if rows is None else rows:
            out[self.key(row)] = row
        return out

    def _lines(self, text: str) -> Iterator[tuple[int, str, T]]:
        """(line number, line, row) of each non-blank line."""
        lines = text.splitlines()
        for lineno, row in numbered_jsonl(text, self.path, refuse=self._refuse):
            try:
                yield lineno, lines[lineno - 1], self.parse(row, lineno)
            except MireInputError as exc:
                raise self.not_ours(exc.lines[0].removeprefix(f"{self.path}: ")) from None

    def _refuse(self, lineno: int, line: str, why: str) -> MireInputError:
        """The error of a line that is not a JSON object: one of ours damaged after it was written (a kill only ever
        cuts the last one) names its record; any other line means the file is not ours."""
        if not line.encode("utf-8").startswith(self.line_start) or not why.startswith("not valid JSON"):
            return self.not_ours(f"line {lineno}: {why}")
        first = _FIRST_KEY.match(line)
        name = ""
        if first:
            what = "record" if first.group(1) == "id" else first.group(1)
            with contextlib.suppress(json.JSONDecodeError):
                value = json.loads('"' + first.group(2) + '"')
                name = f"{what} {value!r}: "
        return MireInputError(f"{self.path}: line {lineno}: {name}{why}; fix or remove the line, then rerun to do "
                              "its work again")

    def not_ours(self, why: str) -> MireInputError:
        return MireInputError(problem(self.path, None, None, f"not {self.kind} ({why}); {self.hint}"))

    # ---------------------------------------------------------------- one writer, resuming

    def lock(self, what: str | None = None):
        """The output's exclusive lock for a whole run; a second run is refused at once (one line, exit 2)."""
        return output_lock(self.path, what=what or f"another {self.writer} is writing it")

    @contextlib.contextmanager
    def resume(self, check: Callable[[list[T]], None] | None = None) -> Iterator[list[T]]:
        """Holds the lock and yields the rows done before (a cut last line repaired). A file that is not ours, or
        that `check` refuses, is refused before anything changes, not even a lock file beside it."""
        rows = self.load(repair=False)
        if check is not None:
            check(rows)
        with self.lock():
            yield self.load()

    def rewrite_without(self, drop: Callable[[T], bool]) -> int:
        """Atomically removes the lines whose row `drop` accepts (e.g. failures asked again); returns how many went."""
        if not self.path.exists():
            return 0
        kept, removed = [], 0
        for _, line, row in self._lines(self.path.read_text(encoding="utf-8")):
            if drop(row):
                removed += 1
            else:
                kept.append(line + "\n")
        if removed:
            write_text_atomic(self.path, "".join(kept))
        return removed

    # ---------------------------------------------------------------- appending

    def open(self) -> AppendLog[T]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._dirty = threading.Event()
        self._closing = False
        self._flusher = threading.Thread(target=self._flush_loop, name="log-fsync", daemon=True)
        self._flusher.start()
        return self

    def close(self) -> None:
        if self._fd is None:
            return
        self._closing = True
        self._dirty.set()
        self._flusher.join()
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> AppendLog[T]:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def _flush_loop(self) -> None:
        # Group commit: one fsync covers every line written since the last one, off the caller's thread (an fsync
        # takes milliseconds, far longer than a write; doing it inline capped distill's throughput).
        while not self._closing:
            self._dirty.wait()
            self._dirty.clear()
            os.fsync(self._fd)

    def append_line(self, line: str) -> None:
        """The line is in the kernel when this returns (a SIGKILL cannot lose it); on disk within one fsync."""
        data = (line + "\n").encode("utf-8")
        while data:  # one write() for a regular file in practice; the loop covers a short write
            data = data[os.write(self._fd, data):]
        self._dirty.set()

    def append(self, row: T) -> None:
        self.append_line(self.dump(row))

    def write(self, rows: list[T]) -> None:
        """Appends several rows, one line each."""
        for row in rows:
            self.append(row)
