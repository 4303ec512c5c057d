"""Derived images: copies of source images that tools.convert writes into its output folder, the one home of image
files made at convert time (a per-task pixel cap, augmented copies).

A copy is a source image plus a chain of operations (`Op`). It is written once, to
`OUTPUT_DIR/derived_images/SHA-OPS.EXT`: SHA is the first 20 hex digits of the source file's sha256, OPS the
operations' parameters, so one name is one picture. An existing file of that name is trusted and never rewritten (a
rerun, or the train and the test conversion, reuse it); a new one is written to a temp file in the run's
`io.OutputSet` and renamed into place with the splits, so a failed run leaves no file half-written.

Operations, applied in the chain's order:
- `max_pixels` P: LLaMA-Factory's own shrink (`mm_plugin._preprocess_image`: when width x height > P, both sides
  times sqrt(P / (width x height)), truncated, PIL's default resampling, in the image's own mode). A copy with only
  this operation is written as PNG (lossless), so training on it gives the pixels LLaMA-Factory would give the source
  at `image_max_pixels: P`.
- `scale` s: both sides times s (at least 28 pixels), bicubic.
- `gray`: grayscale.
- `brightness` b: PIL's ImageEnhance.Brightness factor.
- `jpeg` q: re-encoded as JPEG at quality q (the copy is then that JPEG file).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageEnhance

from .io import MireInputError, OutputSet, problem
from .records import IMAGE_ERRORS, image_error

DERIVED_DIR = "derived_images"
MIN_CAP = 56 * 56  # Qwen2-VL's min_pixels: a smaller cap would be enlarged again by its image processor
OPS = ("max_pixels", "scale", "gray", "brightness", "jpeg")
_PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16")
MIN_SIDE = 28  # Qwen2-VL's patch: LLaMA-Factory's plugin pads smaller sides up to it


@dataclass(frozen=True)
class Op:
    kind: str
    value: float | int | None = None

    def __post_init__(self):
        if self.kind not in OPS:
            raise ValueError(f"unknown image operation {self.kind!r} (known: {', '.join(OPS)})")

    @property
    def slug(self) -> str:
        if self.kind == "max_pixels":
            return f"max{int(self.value)}"
        if self.kind == "scale":
            return f"s{self.value:.2f}"
        if self.kind == "gray":
            return "gray"
        if self.kind == "brightness":
            return f"b{self.value:.2f}"
        return f"q{int(self.value)}"


@dataclass(frozen=True)
class ImageCopy:
    source: Path  # absolute path of the source image
    ops: tuple[Op, ...]

    def __post_init__(self):
        if any(op.kind == "jpeg" for op in self.ops[:-1]):
            raise ValueError("a jpeg operation is the last of a chain: it is the file's encoding")

    @property
    def ext(self) -> str:
        return "jpg" if any(op.kind == "jpeg" for op in self.ops) else "png"

    def file_name(self, sha256: str) -> str:
        return f"{sha256[:20]}-{'-'.join(op.slug for op in self.ops)}.{self.ext}"


def capped_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The size LLaMA-Factory's mm_plugin shrinks an image to under `image_max_pixels` (unchanged when it fits)."""
    if width * height <= max_pixels:
        return width, height
    factor = math.sqrt(max_pixels / (width * height))
    return int(width * factor), int(height * factor)


def cap_ops(size: tuple[int, int], max_pixels: int | None) -> tuple[Op, ...]:
    """The `max_pixels` operation when an image of this (width, height) is over the cap; () when it fits (the source
    itself is then used: no copy)."""
    if max_pixels is None or size[0] * size[1] <= max_pixels:
        return ()
    return (Op("max_pixels", int(max_pixels)),)


def qwen2_vl_tokens(size: tuple[int, int]) -> int:
    """Image tokens Qwen2-VL gives an image of this (width, height) that LLaMA-Factory does not shrink further:
    smart_resize to 28-pixel multiples, one token per 28x28 (2x2 patches merged)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    height, width = smart_resize(size[1], size[0], factor=28, min_pixels=MIN_CAP, max_pixels=28 * 28 * 16384)
    return height * width // (28 * 28)


def apply_ops(image: Image.Image, ops: Iterable[Op]) -> Image.Image:
    for op in ops:
        if op.kind == "max_pixels":
            size = capped_size(image.width, image.height, int(op.value))
            if size != image.size:
                image = image.resize(size)  # exactly LLaMA-Factory's call: its default resampling, the own mode
            continue
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        if op.kind == "scale":
            size = (max(MIN_SIDE, int(image.width * op.value)), max(MIN_SIDE, int(image.height * op.value)))
            image = image.resize(size, Image.Resampling.BICUBIC)
        elif op.kind == "gray":
            image = image.convert("L")
        elif op.kind == "brightness":
            image = ImageEnhance.Brightness(image).enhance(op.value)
        elif op.kind == "jpeg":
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=int(op.value))
            image = Image.open(io.BytesIO(buffer.getvalue()))
    return image


def encode(image: Image.Image, copy: ImageCopy) -> bytes:
    """The copy's file content: the JPEG of its `jpeg` operation, else a lossless PNG."""
    buffer = io.BytesIO()
    if copy.ext == "jpg":
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        image.save(buffer, format="JPEG", quality=int(copy.ops[-1].value))
    else:
        if image.mode not in _PNG_MODES:
            image = image.convert("RGB")  # what LLaMA-Factory converts it to after its resize
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def render(copy: ImageCopy) -> bytes:
    """The copy's file content, made from its source (a `jpeg` operation, always the last, is its encoding)."""
    with Image.open(copy.source) as image:
        image.load()
        ops = copy.ops[:-1] if copy.ext == "jpg" else copy.ops
        return encode(apply_ops(image, ops), copy)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class WriteReport:
    paths: dict[ImageCopy, Path]  # every copy asked for -> its file (absolute)
    written: int  # new files staged in the output set
    reused: int  # files of an earlier run, kept as they were


def write_copies(copies: Iterable[ImageCopy], output_dir: str | os.PathLike, outs: OutputSet,
                 workers: int | None = None) -> WriteReport:
    """Stages in `outs` every copy whose file is not in output_dir/derived_images yet; returns each copy's path.
    Sources are hashed and copies rendered on a thread pool (PIL and hashlib release the GIL)."""
    wanted = list(dict.fromkeys(copies))
    directory = Path(output_dir).absolute() / DERIVED_DIR
    workers = workers or min(8, os.cpu_count() or 1)
    sources = list(dict.fromkeys(c.source for c in wanted))
    with ThreadPoolExecutor(workers) as pool:
        sha = dict(zip(sources, pool.map(file_sha256, sources), strict=True))
        paths = {c: directory / c.file_name(sha[c.source]) for c in wanted}
        todo: dict[Path, ImageCopy] = {}
        for c in wanted:
            if not paths[c].is_file() and paths[c] not in todo:
                todo[paths[c]] = c
        temps = {target: outs.path(target) for target in todo}  # one thread stages (OutputSet is not thread-safe)

        def write(target: Path) -> None:
            try:
                data = render(todo[target])
            except IMAGE_ERRORS as exc:
                raise MireInputError(problem(todo[target].source, None, None,
                                             f"cannot decode the image to derive a copy ({image_error(exc)})")) from None
            with open(temps[target], "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # here, in parallel, so the set's commit finds it on disk already

        list(pool.map(write, todo))
    return WriteReport(paths, len(todo), len(set(paths.values())) - len(todo))
