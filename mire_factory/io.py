"""Reading inputs, writing output sets atomically, locks on outputs, and the exit codes every tool shares.

Exit codes: 0 done; 2 bad input or refused (one line per problem naming the file, the record and the field, and
no output changed); 3 finished, but with failures that a rerun may retry (e.g. teacher requests that failed); 4
training stopped because it diverged (a non-finite loss or gradient norm: mire_factory.nan_guard).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_FAILURES = 3
EXIT_DIVERGED = 4
# Temp files are named .NAME.PID.RANDOM.mire-tmp, so that a later run can tell ours (and whether their writer is
# still alive) from anybody else's hidden files.
TMP_SUFFIX = ".mire-tmp"
_TMP_NAME = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}" + re.escape(TMP_SUFFIX) + "$")
LOCK_SUFFIX = ".lock"


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


def os_error_text(exc: OSError) -> str:
    """`path: reason` for an OSError, in words a user acts on."""
    name = exc.filename if exc.filename is not None else ""
    reason = exc.strerror or " ".join(str(exc).split())[:500] or type(exc).__name__
    if isinstance(exc, IsADirectoryError):
        reason = "is a directory, expected a file"
    elif isinstance(exc, NotADirectoryError):
        reason = "a part of this path is a file, expected a directory"
    elif isinstance(exc, PermissionError):
        reason = "permission denied"
    elif isinstance(exc, FileNotFoundError):
        reason = "not found"
    text = f"{name}: {reason}" if name else reason
    if exc.filename2 is not None:
        text += f" (-> {exc.filename2})"
    return text


# ---------------------------------------------------------------- reading


def _check_readable(path: Path) -> None:
    if path.is_dir():
        raise MireInputError(problem(path, None, None, "is a directory, expected a file"))
    if not path.is_file():
        raise MireInputError(problem(path, None, None, "file not found"))


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MireInputError(problem(path, None, None, f"cannot read ({os_error_text(exc)})")) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise MireInputError(problem(path, None, None, f"line {line}: not UTF-8 text (byte "
                                     f"{data[exc.start]:#04x} at offset {exc.start})")) from None


def _loads(text: str) -> Any:
    """json.loads that reports too-deep nesting as a JSON error (CPython's decoder recurses per level)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", text[:1], 0) from None


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    _check_readable(path)
    text = _read_text(path)
    try:
        return _loads(text)
    except json.JSONDecodeError as exc:
        raise MireInputError(problem(path, None, None, f"not valid JSON ({exc})")) from None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """JSON lines; a blank trailing line is fine, a broken line is an error naming its line number."""
    return [row for _, row in read_numbered_jsonl(path)]


def read_numbered_jsonl(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """read_jsonl with each object's line number in the file."""
    path = Path(path)
    _check_readable(path)
    return numbered_jsonl(_read_text(path), path)


def numbered_jsonl(text: str, path: str | os.PathLike,
                   refuse: Callable[[int, str, str], MireInputError] | None = None) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of JSON-lines text; a line that is not a JSON object is an error
    naming `path` and its line number (`refuse(lineno, line, why)` makes it instead), and so can later checks."""
    refuse = refuse or (lambda lineno, line, why: MireInputError(f"{path}: line {lineno}: {why}"))
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = _loads(line)
        except json.JSONDecodeError as exc:
            raise refuse(lineno, line, f"not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise refuse(lineno, line, f"expected a JSON object, got {type(row).__name__}")
        rows.append((lineno, row))
    return rows


# ---------------------------------------------------------------- writing


def _new_temp(path: Path) -> Path:
    """An empty temp file beside `path`, created with the mode a plain open() would give (0666 less the umask),
    not mkstemp's 0600: outputs are read by other users and containers."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        except OSError as exc:  # name the file the user asked for, not the hidden temp beside it
            raise MireInputError(problem(path, None, None, f"cannot be written ({exc.strerror or exc})")) from exc
        return tmp
    raise FileExistsError(f"no free temp name beside {path}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Removes our temp files (by their name) left in `directory` by killed runs; a live writer's are kept."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        match = _TMP_NAME.match(entry.name)
        if match and entry.is_file(follow_symlinks=False) and not _pid_alive(int(match.group(1))):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def _check_target(path: Path) -> None:
    """Refuses, before anything is written, a target that cannot become a file."""
    if path.is_dir():
        raise MireInputError(problem(path, None, None, "is a directory, expected a file to write"))
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise MireInputError(problem(path, None, None, f"cannot write: {parent} is a file, not a directory"))
            break


class OutputSet:
    """The files one run writes, staged as temp files beside their targets and renamed into place together by
    commit(); on any error before that, every temp is removed and no target has changed.

    Renames are the only step after staging, so a kill leaves either the old set or (between two renames, a window of
    microseconds) part of the new one; it never leaves a half-written file.
    """

    def __init__(self) -> None:
        self._staged: dict[Path, Path] = {}  # target -> temp
        self._removals: list[Path] = []
        self._made_dirs: list[Path] = []  # removed again (when still empty) if the set is discarded
        self._cleaned: set[Path] = set()  # folders already rid of killed runs' temps (once per set: a set of
        # thousands of files in one folder, derived images, must not rescan it per file)
        self.committed: list[Path] = []
        self.done = False

    def path(self, target: str | os.PathLike) -> Path:
        """A temp path to write `target`'s content to (created empty, mode 0666 less the umask)."""
        target = Path(target)
        if target in self._staged:
            return self._staged[target]
        _check_target(target)
        missing = [p for p in (target.parent, *target.parent.parents) if not p.exists()]
        target.parent.mkdir(parents=True, exist_ok=True)
        self._made_dirs += missing
        if target.parent not in self._cleaned:
            clean_stale_temps(target.parent)
            self._cleaned.add(target.parent)
        self._staged[target] = tmp = _new_temp(target)
        return tmp

    def write_text(self, target: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
        self.path(target).write_text(text, encoding=encoding)
        return Path(target)

    def write_json(self, target: str | os.PathLike, obj: Any) -> Path:
        return self.write_text(target, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")

    def write_jsonl(self, target: str | os.PathLike, rows: Iterable[dict]) -> Path:
        return self.write_text(target, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    def remove(self, target: str | os.PathLike) -> None:
        """Deletes `target` (a file this tool wrote before and no longer writes) at commit."""
        target = Path(target)
        if target.is_file() or target.is_symlink():
            self._removals.append(target)

    def commit(self) -> list[Path]:
        self.done = True
        for target, tmp in self._staged.items():
            _check_target(target)
            fd = os.open(tmp, os.O_RDONLY)  # on disk before it takes the target's name, so a crash leaves no
            try:  # empty file under that name
                os.fsync(fd)
            finally:
                os.close(fd)
        for target, tmp in list(self._staged.items()):
            os.replace(tmp, target)
            del self._staged[target]
            self.committed.append(target)
        for target in self._removals:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target)
        return self.committed

    def discard(self) -> None:
        for tmp in self._staged.values():
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        self._staged.clear()
        if not self.committed:
            for directory in self._made_dirs:  # deepest first
                with contextlib.suppress(OSError):
                    directory.rmdir()
        self._made_dirs.clear()

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None and not self.done:
            self.commit()
        self.discard()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temp path beside `path`; renamed onto it only when the block succeeds."""
    with OutputSet() as outs:
        yield outs.path(path)


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    with OutputSet() as outs:
        outs.write_text(path, text, encoding)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    with OutputSet() as outs:
        outs.write_json(path, obj)


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    with OutputSet() as outs:
        outs.write_jsonl(path, rows)


# ---------------------------------------------------------------- locks


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of an output: hidden beside it. filelock leaves it in place on release, so that every waiter
    locks the same inode."""
    path = Path(path)
    return path.with_name(f".{path.name}{LOCK_SUFFIX}")


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, timeout: float = 0, what: str = "another run is writing it") -> Iterator[Path]:
    """Holds the exclusive lock of an output (filelock: flock on Unix, released by the kernel when a process dies).
    With timeout 0 a second run is refused at once: MireInputError, one line, exit 2."""
    from filelock import FileLock, Timeout

    path = Path(path)
    lock_file = lock_path(path)
    _check_target(lock_file)
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        # filelock reports a lock file it cannot create (an unwritable folder) as a Timeout, "held by another run"
        lock_file.touch(exist_ok=True)
        lock = FileLock(lock_file, timeout=timeout)
        lock.acquire()
    except Timeout:
        raise MireInputError(problem(path, None, None, f"{what} (lock {lock_file} is held); wait for that run to end "
                                     "or stop it")) from None
    except OSError as exc:
        raise MireInputError(problem(path, None, None, f"cannot lock it ({os_error_text(exc)})")) from None
    try:
        yield path
    finally:
        lock.release()


# ---------------------------------------------------------------- running a tool


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Runs a tool's main: bad input, and what the system refuses (unreadable or unwritable paths, a directory
    where a file goes, text that is not UTF-8, nesting too deep to read), print one line each to stderr and exit 2;
    never a traceback for these."""
    try:
        code = main(argv)
    except MireInputError as exc:
        for line in exc.lines:
            print(f"error: {line}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except OSError as exc:
        print(f"error: {os_error_text(exc)}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except UnicodeError as exc:
        print(f"error: text that is not valid UTF-8 ({exc})", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except RecursionError:
        print("error: input nested too deeply to read", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
