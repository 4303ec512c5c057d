"""Info files: per-image text (OCR lines, or a teacher's reply) written by tools.extract_info and tools.generate, read
by tools.convert's screenshot-text prompt variant and the quality harness's TF-IDF anchor.

An info file is JSON lines, one row per image name:
    {"image": "a/b.jpg", "sha256": "<of the file's bytes>", "backend": "ocr" | "teacher", "model": "...",
     "status": "ok" | "refused" | "failed", "text": "the image's text, lines joined by \\n",
     "lines": [{"text", "box": [[x, y] x 4], "score"}] (OCR), "info": {...} (a teacher's parsed JSON), ...}
`image` is the name as the records (or the folder listing) give it, relative to --image_dir; `text` is what prompts
use. Work is keyed by the content hash: a rerun skips an image whose bytes were done already (under any name), so
renamed or copied images cost nothing, and readers may look an image up by its bytes rather than its name.

One file holds one origin (backend, model and prompt): a run with another origin is refused, so a file never mixes
two OCR engines or two prompts.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

from .append_log import AppendLog
from .io import MireInputError, problem, read_numbered_jsonl
from .teacher import Plan

Backend = Literal["ocr", "teacher"]
STATUSES = ("ok", "refused", "failed")
BACKENDS = ("ocr", "teacher")
LINE_START = b'{"image": '  # how every line of an info file begins (InfoRecord.to_json)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class InfoRecord:
    image: str  # the image's name relative to --image_dir, as the records name it
    sha256: str  # of the file's bytes: the key a rerun skips done work by
    backend: str  # "ocr" or "teacher"
    model: str  # the OCR engine and its models, or the teacher's model name
    status: str  # ok, refused (teacher: the provider refused) or failed (error says why)
    text: str | None = None  # what prompts use: OCR lines in reading order, or the teacher's text, joined by \n
    lines: list[dict] | None = None  # OCR: {"text", "box": 4 [x, y] corners in pixels, "score": confidence}
    info: dict | None = None  # teacher: the reply's JSON object, when it had one
    prompt_sha256: str | None = None  # teacher: of the system and user prompts (part of the file's origin)
    width: int | None = None
    height: int | None = None
    raw: str | None = None  # teacher: the reply as received
    usage: dict = field(default_factory=dict)
    latency_s: float | None = None  # seconds this image took (OCR compute, or the teacher's request with retries)
    error: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @property
    def origin(self) -> tuple[str, str, str | None]:
        return (self.backend, self.model, self.prompt_sha256)


_FIELDS = {f.name for f in fields(InfoRecord)}


def describe_origin(origin: tuple[str, str, str | None]) -> str:
    backend, model, prompt = origin
    return f"{backend} {model!r}" + (f" with prompt sha256 {prompt[:12]}" if prompt else "")


def info_from_dict(row: dict, source: str | os.PathLike = "<info>", lineno: int | None = None) -> InfoRecord:
    """A row of an info file; MireInputError naming the line and the field when it is not one."""
    where = f"{source}: line {lineno}" if lineno else str(source)
    name = row.get("image")

    def bad(field_name: str, message: str) -> MireInputError:
        return MireInputError(f"{where}: image {name!r}: field '{field_name}': {message}")

    for key in ("image", "sha256", "backend", "model", "status"):
        if not isinstance(row.get(key), str) or not row[key]:
            raise bad(key, f"expected a non-empty string, got {row.get(key)!r}")
    if row["status"] not in STATUSES:
        raise bad("status", f"expected one of {STATUSES}, got {row['status']!r}")
    if row["backend"] not in BACKENDS:
        raise bad("backend", f"expected one of {BACKENDS}, got {row['backend']!r}")
    for key in ("text", "prompt_sha256", "raw", "error"):
        if row.get(key) is not None and not isinstance(row[key], str):
            raise bad(key, f"expected a string or null, got {type(row[key]).__name__}")
    if row.get("lines") is not None and not (isinstance(row["lines"], list)
                                             and all(isinstance(x, dict) and isinstance(x.get("text"), str)
                                                     for x in row["lines"])):
        raise bad("lines", "expected a list of {\"text\", \"box\", \"score\"} objects")
    if row.get("info") is not None and not isinstance(row["info"], dict):
        raise bad("info", f"expected an object or null, got {type(row['info']).__name__}")
    for key in ("width", "height"):
        if row.get(key) is not None and (not isinstance(row[key], int) or isinstance(row[key], bool)):
            raise bad(key, f"expected an integer or null, got {row[key]!r}")
    if not isinstance(row.get("usage", {}), dict):
        raise bad("usage", "expected an object of token counts")
    latency = row.get("latency_s")
    if latency is not None and (not isinstance(latency, int | float) or isinstance(latency, bool)):
        raise bad("latency_s", f"expected a number or null, got {type(latency).__name__}")
    return InfoRecord(**{k: v for k, v in row.items() if k in _FIELDS})


class InfoLog(AppendLog[InfoRecord]):
    """An info file being written: appended one line per image, resumable after a kill."""

    line_start = LINE_START
    kind = "an info file of tools.extract_info / tools.generate"
    hint = "these tools append only to an info file or a new or empty one: choose another --output_file"

    def parse(self, row: dict, lineno: int) -> InfoRecord:
        return info_from_dict(row, self.path, lineno)

    def append(self, rec: InfoRecord) -> None:
        self.append_line(rec.to_json())

    def check_origin(self, rows: list[InfoRecord], origin: tuple[str, str, str | None]) -> None:
        """A file holds one origin; refuses (exit 2) a run of another one."""
        other = next((r for r in rows if r.origin != origin), None)
        if other is not None:
            raise MireInputError(problem(self.path, None, None, f"holds info from {describe_origin(other.origin)}, "
                                         f"this run is {describe_origin(origin)}; one info file holds one origin: "
                                         "choose another --output_file"))


# ---------------------------------------------------------------- the images of a run


@dataclass
class ImageItem:
    name: str  # relative to the image folder, with forward slashes
    path: Path
    sha256: str


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def images_of_records(records, image_dir: str | os.PathLike) -> list[str]:
    """Every image name of the records, once each, in order of first use."""
    return list(dict.fromkeys(name for r in records for name in r.images))


def images_in_dir(image_dir: str | os.PathLike) -> list[str]:
    """Every image file under image_dir (by its suffix), as sorted relative names; hidden entries are skipped."""
    root = Path(image_dir)
    if not root.is_dir():
        raise MireInputError(problem(root, None, None, "not a directory (--image_dir)"))
    names = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(root)
        names += [(rel / f).as_posix() for f in filenames
                  if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)]
    if not names:
        raise MireInputError(problem(root, None, None, f"no image files ({', '.join(IMAGE_SUFFIXES)})"))
    return sorted(names)


def hash_images(names: list[str], image_dir: str | os.PathLike) -> list[ImageItem]:
    """The items with their content hashes; every unreadable file is one line of a MireInputError (exit 2, before
    anything is written)."""
    items, problems = [], []
    for name in names:
        path = Path(image_dir) / name
        try:
            items.append(ImageItem(name, path, file_sha256(path)))
        except OSError as exc:
            problems.append(problem(path, None, None, f"cannot read the image ({exc.strerror or exc})"))
    if problems:
        raise MireInputError(problems)
    return items


def select_images(image_dir: str | os.PathLike, input_file: str | os.PathLike | None = None, task: str = "all",
                  limit: int | None = None) -> list[ImageItem]:
    """The images of a run, hashed: those of a MIRE json's records (checked as every tool checks them; `task` keeps
    one task's), else every image file under image_dir; `limit` keeps the first N."""
    if input_file is not None:
        from .records import load_records

        records = load_records(input_file, image_dir)
        names = images_of_records([r for r in records if task in ("all", r.task)], image_dir)
        if not names:
            raise MireInputError(problem(input_file, None, None, f"no images in the {task} records"))
    else:
        names = images_in_dir(image_dir)
    return hash_images(names[:limit] if limit is not None else names, image_dir)


@dataclass
class ImagePlan(Plan):
    copies: list[tuple[ImageItem, InfoRecord]] = field(default_factory=list)  # done under another name: copied


def plan_images(items: list[ImageItem], existing: list[InfoRecord], retry_failed: bool = False) -> ImagePlan:
    """What a run must do. `todo` holds lists of items sharing one content hash (worked on once, written once per
    name); an item whose bytes are done under another name is copied; failed hashes wait for --retry_failed."""
    done: dict[str, InfoRecord] = {}
    failed: set[str] = set()
    named: set[tuple[str, str]] = set()
    for rec in existing:
        if rec.status in ("ok", "refused"):
            done[rec.sha256] = rec
            named.add((rec.image, rec.sha256))
        else:
            failed.add(rec.sha256)
    failed -= set(done)
    plan = ImagePlan(todo=[])
    groups: dict[str, list[ImageItem]] = defaultdict(list)
    for item in items:
        if (item.name, item.sha256) in named:
            plan.skipped_done += 1
        elif item.sha256 in done:
            plan.copies.append((item, done[item.sha256]))
            named.add((item.name, item.sha256))
        elif item.sha256 in failed and not retry_failed:
            plan.skipped_failed += 1
        else:
            if item.sha256 in failed:
                plan.retrying.add(item.sha256)
            groups[item.sha256].append(item)
    plan.todo = list(groups.values())
    return plan


def copy_for(item: ImageItem, done: InfoRecord) -> InfoRecord:
    """The row of an image whose bytes were done under another name."""
    return InfoRecord(**{**asdict(done), "image": item.name, "latency_s": 0.0})


# ---------------------------------------------------------------- reading


@dataclass
class InfoIndex:
    """The usable text of an info file (ok rows; the last one wins): by content hash, and by image name for
    messages."""

    path: Path
    by_sha256: dict[str, str]
    by_name: dict[str, str]
    origin: tuple[str, str, str | None] | None

    def text_for(self, image_path: str | os.PathLike) -> str | None:
        """The text of an image, looked up by its bytes (a renamed or moved image still finds its text, a changed
        one does not); None when the file has no usable row for these bytes."""
        return self.by_sha256.get(file_sha256(image_path))


def read_info_file(path: str | os.PathLike) -> InfoIndex:
    rows = [info_from_dict(row, path, lineno) for lineno, row in read_numbered_jsonl(path)]
    by_sha, by_name = {}, {}
    for rec in rows:
        if rec.status == "ok" and rec.text is not None:
            by_sha[rec.sha256] = rec.text
            by_name[rec.image] = rec.text
    origins = {r.origin for r in rows}
    return InfoIndex(Path(path), by_sha, by_name, next(iter(origins)) if len(origins) == 1 else None)
