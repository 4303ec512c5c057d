"""Loading and checking MIRE json files. A file is train (every record has a gold `output`) or test (no record has
one: `output` absent, null or ""), decided once for the whole file by one rule that every tool shares."""

from __future__ import annotations

import os
import threading
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from PIL import Image, UnidentifiedImageError

from .io import MireInputError, problem, read_json
from .taxonomy import LABELS, Task, detect_task, normalize_label

IMAGE_PLACEHOLDER = "<image>"
Kind = Literal["auto", "train", "test"]
KINDS: tuple[str, ...] = ("auto", "train", "test")


@dataclass
class MireRecord:
    """One record, whichever file it came from: a MIRE json (records.read_mire_file) or a ShareGPT file in
    LLaMA-Factory's normal form (sharegpt.read_sharegpt), where `instruction` is the user turn as written (prompt
    variant included), `images` are paths as LLaMA-Factory resolves them, and `response` the assistant turn."""

    id: str
    instruction: str  # the user's text, <image> placeholders where the images go
    images: list[str]
    task: Task
    output: str | None = None  # canonical gold label, or None (test data)
    input: str = ""
    index: int = 0
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height), read from headers
    system: str = ""  # ShareGPT: the system prompt ("" for none, as LLaMA-Factory's normal form has it)
    response: str = ""  # ShareGPT: the assistant turn as written (label, CoT JSON) or "" for test data

    @property
    def has_label(self) -> bool:
        return self.output is not None


_BOMB_CHECK = threading.Lock()


def image_size(path: str | os.PathLike, verify: bool = False) -> tuple[int, int]:
    """(width, height) from the file header; `verify` decodes the whole image too. An image past PIL's
    decompression-bomb limit is an error here, not a warning: no screenshot has 89 million pixels."""
    # catch_warnings changes process-wide state: one thread at a time opens (reads the header, where PIL checks the
    # size); the decoding runs outside the lock, in parallel
    with _BOMB_CHECK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(path)
    with img:
        size = img.size
        if verify:
            img.load()
    return size


# What PIL raises on a file that is not a readable image (a truncated JPEG only fails when decoded; image_size turns
# the decompression-bomb warning into an error).
IMAGE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
                Image.DecompressionBombWarning)


def image_error(exc: BaseException) -> str:
    """The reason an image could not be read, in the decoder's words (e.g. "OSError: image file is truncated")."""
    detail = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def resolve_image(image_dir: str | os.PathLike, name: str) -> Path | None:
    """The image's path inside image_dir, or None when the name escapes it (absolute, `..`)."""
    if not name or os.path.isabs(name) or name.startswith(("/", "\\")):
        return None
    root = Path(image_dir).resolve()
    path = (root / name).resolve()
    if path != root and root in path.parents:
        return path
    return None


def has_gold(item: object) -> bool:
    """Whether a raw record counts as labelled: `output` present and not empty (null and "" are unlabelled).

    A non-string `output` counts as labelled, so that its type error is reported where a label was meant."""
    if not isinstance(item, dict):
        return False
    output = item.get("output")
    return output is not None and not (isinstance(output, str) and not output.strip())


def resolve_kind(raw: list, file: str | os.PathLike, kind: Kind = "auto") -> tuple[str, list[str]]:
    """The file's kind, decided for the whole file: `auto` is test when no record has a label, train when every
    record has one; a mix is a problem naming the first record of the smaller group."""
    if kind != "auto":
        return kind, []
    items = [(index, item) for index, item in enumerate(raw) if isinstance(item, dict)]
    labelled = [(index, item) for index, item in items if has_gold(item)]
    unlabelled = [(index, item) for index, item in items if not has_gold(item)]
    if not labelled:
        return "test", []
    if not unlabelled:
        return "train", []
    minority, what = (labelled, "has a label") if len(labelled) < len(unlabelled) else (unlabelled, "has none")
    index, item = minority[0]
    rid = item.get("id")
    ref = rid if isinstance(rid, str) and rid else index
    return "auto", [problem(
        file, ref, "output",
        f"{what} ({'empty or absent' if what == 'has none' else repr(item.get('output'))}), while "
        f"{len(labelled)} records are labelled and {len(unlabelled)} are not: a file is train (every record "
        f"labelled) or test (none); fix it, or pass --kind train or --kind test",
    )]


def _decode_all(paths: list[Path], decode: bool) -> list[tuple[int, int] | BaseException]:
    """Each image's size, or the exception reading it; decoding runs in a thread pool (PIL releases the GIL)."""

    def one(path: Path):
        try:
            return image_size(path, verify=decode)
        except IMAGE_ERRORS as exc:
            return exc

    if len(paths) < 2:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(one, paths))


def check_records(
    raw: object,
    file: str | os.PathLike,
    image_dir: str | os.PathLike | None,
    kind: Kind = "auto",
    decode_images: bool = True,
) -> tuple[list[MireRecord], list[str]]:
    """Every problem as one line (file, record, field); records that passed are returned too.

    decode_images: decode every image fully (a truncated file only fails then); False reads headers only."""
    records, problems, _ = _check(raw, file, image_dir, kind, decode_images)
    return records, problems


def _check(raw, file, image_dir, kind: Kind, decode_images: bool) -> tuple[list[MireRecord], list[str], str]:
    if not isinstance(raw, list):
        return [], [problem(file, None, None, f"expected a JSON list of records, got {type(raw).__name__}")], kind
    kind, kind_problems = resolve_kind(raw, file, kind)
    if kind_problems:
        return [], kind_problems, kind
    seen: Counter[str] = Counter()
    # per item: its problems, the record's fields (None when it has none), its reference and its images to read
    pending: list[tuple[list[str], dict | None, str | int, list[tuple[int, str, Path]]]] = []
    for index, item in enumerate(raw):
        mine: list[str] = []
        if not isinstance(item, dict):
            mine.append(problem(file, index, None, f"expected a JSON object, got {type(item).__name__}"))
            pending.append((mine, None, index, []))
            continue
        rid = item.get("id")
        ref: str | int = rid if isinstance(rid, str) and rid else index
        if "id" not in item:
            mine.append(problem(file, ref, "id", "missing field"))
        elif not isinstance(rid, str) or not rid:
            mine.append(problem(file, ref, "id", f"expected a non-empty string, got {rid!r}"))
        else:
            seen[rid] += 1
            if seen[rid] == 2:
                mine.append(problem(file, ref, "id", "duplicate id"))
        required = ["instruction", "image"] + (["output"] if kind == "train" else [])
        for name in required:
            if name not in item:
                mine.append(problem(file, ref, name, "missing field"))
        instruction = item.get("instruction")
        if "instruction" in item and not isinstance(instruction, str):
            mine.append(problem(file, ref, "instruction", f"expected a string, got {type(instruction).__name__}"))
            instruction = None
        if "input" in item and not isinstance(item["input"], str):
            mine.append(problem(file, ref, "input", f"expected a string, got {type(item['input']).__name__}"))
        images = item.get("image")
        if "image" in item and (not isinstance(images, list) or not all(isinstance(x, str) for x in images)):
            mine.append(problem(file, ref, "image", "expected a list of file names"))
            images = None
        task: Task | None = None
        if isinstance(instruction, str):
            try:
                task = detect_task(instruction)
            except ValueError as exc:
                mine.append(problem(file, ref, "instruction", str(exc)))
            if isinstance(images, list):
                n = instruction.count(IMAGE_PLACEHOLDER)
                if n != len(images):
                    mine.append(
                        problem(file, ref, "image", f"{n} {IMAGE_PLACEHOLDER} placeholders but {len(images)} images")
                    )
        output = item.get("output")
        label: str | None = None
        if "output" in item and output is not None:
            if not isinstance(output, str):
                mine.append(problem(file, ref, "output", f"expected a string, got {type(output).__name__}"))
            elif not output.strip():
                if kind == "train":
                    mine.append(problem(file, ref, "output", "empty: a train record needs its gold label"))
            elif task is not None:
                label = normalize_label(output)
                if label not in LABELS[task]:
                    mine.append(problem(file, ref, "output", f"unknown label {output!r} for the {task} task"))
        elif "output" in item and kind == "train":
            mine.append(problem(file, ref, "output", "null: a train record needs its gold label"))
        to_read: list[tuple[int, str, Path]] = []
        if isinstance(images, list) and image_dir is not None:
            for pos, name in enumerate(images):
                if "\x00" in name:
                    mine.append(problem(file, ref, f"image[{pos}]", f"{name!r} holds a NUL character"))
                    continue
                path = resolve_image(image_dir, name)
                if path is None:
                    mine.append(problem(file, ref, f"image[{pos}]", f"{name!r} resolves outside the image directory"))
                elif not path.is_file():
                    mine.append(problem(file, ref, f"image[{pos}]", f"image not found: {path}"))
                else:
                    to_read.append((pos, name, path))
        fields = None
        if task is not None:
            fields = dict(id=rid, instruction=instruction, images=list(images or []), task=task, output=label,
                          input=item.get("input", ""), index=index)
        pending.append((mine, fields, ref, to_read))

    results = iter(_decode_all([path for *_, to_read in pending for _, _, path in to_read], decode_images))
    records: list[MireRecord] = []
    problems: list[str] = []
    for mine, fields, ref, to_read in pending:
        sizes = []
        for pos, name, _ in to_read:
            result = next(results)
            if isinstance(result, BaseException):
                mine.append(problem(file, ref, f"image[{pos}]", f"cannot decode {name!r} ({image_error(result)})"))
            else:
                sizes.append(result)
        problems.extend(mine)
        if not mine and fields is not None:
            records.append(MireRecord(**fields, image_sizes=sizes))
    return records, problems, kind


@dataclass
class MireFile:
    """A checked MIRE json: its records and its kind, decided once for the whole file."""

    path: Path
    kind: str  # "train" (every record labelled) or "test"
    records: list[MireRecord]


def read_mire_file(
    file: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    kind: Kind = "auto",
    decode_images: bool = True,
) -> MireFile:
    """Loads and checks a MIRE json; MireInputError with every problem when anything is wrong."""
    raw = read_json(file)
    records, problems, resolved = _check(raw, file, image_dir, kind, decode_images)
    if problems:
        raise MireInputError(problems)
    if not records:
        raise MireInputError(problem(file, None, None, "no records"))
    return MireFile(Path(file), resolved, records)


def load_records(
    file: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    kind: Kind = "auto",
    decode_images: bool = True,
) -> list[MireRecord]:
    """The records of read_mire_file."""
    return read_mire_file(file, image_dir, kind, decode_images).records


def summarize(records: list[MireRecord]) -> str:
    tasks = Counter(r.task for r in records)
    n_images = sum(len(r.images) for r in records)
    labelled = sum(r.has_label for r in records)
    return (
        f"{len(records)} records ({tasks.get('image', 0)} image, {tasks.get('dialogue', 0)} dialogue), "
        f"{n_images} images, {labelled} labelled"
    )
