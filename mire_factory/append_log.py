"""Append-only JSON-lines logs that long jobs resume from: reasons of tools.distill, info files of
tools.extract_info and tools.generate.

Each line is written with a single write() and fsync'd by a group-commit thread, so a kill loses at most the work in
flight, never a finished result. Loading repairs a last line cut by a kill, and refuses (before anything changes) a
file that is not a log of this kind: a tool appends only to its own files, or to a new or empty one.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from .io import MireInputError, numbered_jsonl, problem, write_text_atomic

T = TypeVar("T")


class AppendLog(Generic[T]):
    """Subclasses set `line_start` (how every line begins: the first key of the row's JSON), `kind` (e.g. "a
    reasons file of tools.distill"), `hint` (what to do instead) and `parse(row, lineno)` (a row or MireInputError)."""

    line_start: bytes = b"{"
    kind: str = "a log"
    hint: str = "choose another --output_file"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.repaired_bytes = 0

    def parse(self, row: dict, lineno: int) -> T:
        raise NotImplementedError

    def load(self, repair: bool = True) -> list[T]:
        """The file's rows. `repair` cuts an unfinished last line left by a kill."""
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
            rows = [self.parse(row, k) for k, row in numbered_jsonl(text, self.path)]
        except UnicodeDecodeError as exc:
            raise self.not_ours(f"not UTF-8 text at byte {exc.start}") from None
        except MireInputError as exc:
            raise self.not_ours(exc.lines[0].removeprefix(f"{self.path}: ")) from None
        if tail and repair:
            self.repaired_bytes = len(tail)
            os.truncate(self.path, keep)
        return rows

    def not_ours(self, why: str) -> MireInputError:
        return MireInputError(problem(self.path, None, None, f"not {self.kind} ({why}); {self.hint}"))

    def rewrite_without(self, drop: Callable[[dict], bool]) -> int:
        """Atomically removes the lines whose row `drop` accepts; returns how many went."""
        if not self.path.exists():
            return 0
        kept, removed = [], 0
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                if drop(numbered_jsonl(line, self.path)[0][1]):
                    removed += 1
                    continue
                kept.append(line + "\n")
        if removed:
            write_text_atomic(self.path, "".join(kept))
        return removed

    def __enter__(self) -> AppendLog[T]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._dirty = threading.Event()
        self._closing = False
        self._flusher = threading.Thread(target=self._flush_loop, name="log-fsync", daemon=True)
        self._flusher.start()
        return self

    def __exit__(self, *exc) -> None:
        self._closing = True
        self._dirty.set()
        self._flusher.join()
        os.fsync(self._fd)
        os.close(self._fd)

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
