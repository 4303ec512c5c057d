"""Loading and checking MIRE json files (train: with `output`; test: without)."""

from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from PIL import Image, UnidentifiedImageError

from .io import MireInputError, problem, read_json
from .taxonomy import LABELS, Task, detect_task, normalize_label

IMAGE_PLACEHOLDER = "<image>"
Kind = Literal["auto", "train", "test"]


@dataclass
class MireRecord:
    id: str
    instruction: str
    images: list[str]
    task: Task
    output: str | None = None  # canonical label (train) or None (test)
    input: str = ""
    index: int = 0
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height), read from headers

    @property
    def has_label(self) -> bool:
        return self.output is not None


def image_size(path: str | os.PathLike, verify: bool = False) -> tuple[int, int]:
    """(width, height) from the file header; `verify` decodes the whole image too. An image past PIL's
    decompression-bomb limit is an error here, not a warning: no screenshot has 89 million pixels."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            size = img.size
            if verify:
                img.load()
    return size


def decode_error_text(exc: BaseException) -> str:
    """What went wrong decoding an image, in the decoder's words (e.g. "image file is truncated")."""
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


def check_records(
    raw: object,
    file: str | os.PathLike,
    image_dir: str | os.PathLike | None,
    kind: Kind = "auto",
    verify_images: bool = False,
) -> tuple[list[MireRecord], list[str]]:
    """Every problem as one line (file, record, field); records that passed are returned too."""
    problems: list[str] = []
    if not isinstance(raw, list):
        return [], [problem(file, None, None, f"expected a JSON list of records, got {type(raw).__name__}")]
    if kind == "auto":
        kind = "train" if raw and isinstance(raw[0], dict) and "output" in raw[0] else "test"
    seen: Counter[str] = Counter()
    records: list[MireRecord] = []
    for index, item in enumerate(raw):
        before = len(problems)
        if not isinstance(item, dict):
            problems.append(problem(file, index, None, f"expected a JSON object, got {type(item).__name__}"))
            continue
        rid = item.get("id")
        ref: str | int = rid if isinstance(rid, str) and rid else index
        if "id" not in item:
            problems.append(problem(file, ref, "id", "missing field"))
        elif not isinstance(rid, str) or not rid:
            problems.append(problem(file, ref, "id", f"expected a non-empty string, got {rid!r}"))
        else:
            seen[rid] += 1
            if seen[rid] == 2:
                problems.append(problem(file, ref, "id", "duplicate id"))
        required = ["instruction", "image"] + (["output"] if kind == "train" else [])
        for name in required:
            if name not in item:
                problems.append(problem(file, ref, name, "missing field"))
        instruction = item.get("instruction")
        if "instruction" in item and not isinstance(instruction, str):
            problems.append(problem(file, ref, "instruction", f"expected a string, got {type(instruction).__name__}"))
            instruction = None
        if "input" in item and not isinstance(item["input"], str):
            problems.append(problem(file, ref, "input", f"expected a string, got {type(item['input']).__name__}"))
        images = item.get("image")
        if "image" in item and (not isinstance(images, list) or not all(isinstance(x, str) for x in images)):
            problems.append(problem(file, ref, "image", "expected a list of file names"))
            images = None
        task: Task | None = None
        if isinstance(instruction, str):
            try:
                task = detect_task(instruction)
            except ValueError as exc:
                problems.append(problem(file, ref, "instruction", str(exc)))
            if isinstance(images, list):
                n = instruction.count(IMAGE_PLACEHOLDER)
                if n != len(images):
                    problems.append(
                        problem(file, ref, "image", f"{n} {IMAGE_PLACEHOLDER} placeholders but {len(images)} images")
                    )
        output = item.get("output")
        label: str | None = None
        if "output" in item:
            if not isinstance(output, str):
                problems.append(problem(file, ref, "output", f"expected a string, got {type(output).__name__}"))
            elif task is not None:
                label = normalize_label(output)
                if label not in LABELS[task]:
                    problems.append(problem(file, ref, "output", f"unknown label {output!r} for the {task} task"))
        sizes: list[tuple[int, int]] = []
        if isinstance(images, list) and image_dir is not None:
            for pos, name in enumerate(images):
                if "\x00" in name:
                    problems.append(problem(file, ref, f"image[{pos}]", f"{name!r} holds a NUL character"))
                    continue
                path = resolve_image(image_dir, name)
                if path is None:
                    problems.append(problem(file, ref, f"image[{pos}]", f"{name!r} resolves outside the image directory"))
                    continue
                if not path.is_file():
                    problems.append(problem(file, ref, f"image[{pos}]", f"image not found: {path}"))
                    continue
                try:
                    sizes.append(image_size(path, verify=verify_images))
                except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
                        Image.DecompressionBombWarning) as exc:
                    problems.append(problem(file, ref, f"image[{pos}]",
                                            f"cannot decode {name!r} ({decode_error_text(exc)})"))
        if len(problems) == before and task is not None:
            records.append(
                MireRecord(
                    id=rid,
                    instruction=instruction,
                    images=list(images),
                    task=task,
                    output=label,
                    input=item.get("input", ""),
                    index=index,
                    image_sizes=sizes,
                )
            )
    return records, problems


def load_records(
    file: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    kind: Kind = "auto",
    verify_images: bool = False,
) -> list[MireRecord]:
    """Loads and checks a MIRE json; MireInputError with every problem when anything is wrong."""
    raw = read_json(file)
    records, problems = check_records(raw, file, image_dir, kind=kind, verify_images=verify_images)
    if problems:
        raise MireInputError(problems)
    if not records:
        raise MireInputError(problem(file, None, None, "no records"))
    return records


def summarize(records: list[MireRecord]) -> str:
    tasks = Counter(r.task for r in records)
    n_images = sum(len(r.images) for r in records)
    labelled = sum(r.has_label for r in records)
    return (
        f"{len(records)} records ({tasks.get('image', 0)} image, {tasks.get('dialogue', 0)} dialogue), "
        f"{n_images} images, {labelled} labelled"
    )
