"""LLaMA-Factory's dataset_info.json: the registration entry of a MIRE ShareGPT file (with the prompt variant it was
written with), reading it back, and an atomic merge under a lock (read-modify-write: two tools registering into one
folder at once both keep their entries)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from .io import MireInputError, OutputSet, output_lock, problem, read_json
from .prompt_variants import DEFAULT_PROMPT_VARIANT, PromptVariant, get_prompt_variant

DATASET_INFO = "dataset_info.json"
SPLITS = ("train", "val", "test")
# Our key in a registration entry; LLaMA-Factory's DatasetAttr.join reads only the keys it knows and ignores it.
PROMPT_VARIANT_KEY = "mire_prompt_variant"
# A screenshot-text variant's source: the info file, its token budget and origin, and how many records it cut.
SCREENSHOT_TEXT_KEY = "mire_screenshot_text"


def sharegpt_entry(file_name: str, prompt_variant: str = DEFAULT_PROMPT_VARIANT) -> dict:
    """How LLaMA-Factory reads a file written by tools.convert: messages + images, role/content tags; plus the
    prompt variant the file's turns were written with."""
    return {
        "file_name": file_name,
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
        PROMPT_VARIANT_KEY: prompt_variant,
    }


def entry_variant(entry: dict, where: str | os.PathLike, name: str) -> PromptVariant:
    """The prompt variant a registration records; entries written before variants existed are plain."""
    try:
        return get_prompt_variant(entry.get(PROMPT_VARIANT_KEY))
    except ValueError as exc:
        raise MireInputError(problem(where, None, f"{name}.{PROMPT_VARIANT_KEY}", str(exc))) from None


def file_registration(dataset_file: str | os.PathLike) -> tuple[str, dict] | None:
    """(name, entry) of the registration of `dataset_file` in the dataset_info.json beside it; None when none."""
    dataset_file = Path(dataset_file)
    info = read_dataset_info(dataset_file.parent)
    for name, entry in info.items():
        if isinstance(entry, dict) and entry.get("file_name") == dataset_file.name:
            return name, entry
    return None


def dataset_name(split: str, task: str = "all") -> str:
    """mire_train / mire_val / mire_test; with a single task mire_image_train, mire_dialogue_val, ..."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return f"mire_{split}" if task == "all" else f"mire_{task}_{split}"


def read_dataset_info(output_dir: str | os.PathLike) -> dict:
    """The existing registrations (empty when there is no file); a broken file is an input error."""
    path = Path(output_dir) / DATASET_INFO
    if not path.exists():
        return {}
    info = read_json(path)
    if not isinstance(info, dict):
        raise MireInputError(problem(path, None, None, f"expected a JSON object, got {type(info).__name__}"))
    return info


LOCK_TIMEOUT_S = 120.0  # a read-modify-write takes milliseconds; waiting this long means a stuck writer


@contextlib.contextmanager
def locked_dataset_info(output_dir: str | os.PathLike) -> Iterator[dict]:
    """Holds output_dir/dataset_info.json's lock and yields its registrations, read under the lock; the caller
    stages the new file and commits its output set before the block ends."""
    with output_lock(Path(output_dir) / DATASET_INFO, timeout=LOCK_TIMEOUT_S, what="another tool is updating it"):
        yield read_dataset_info(output_dir)


def commit_registrations(outs: OutputSet, output_dir: str | os.PathLike, entries: dict[str, dict],
                         unregister: Mapping[str, str] | None = None) -> Path:
    """Commits `outs` together with dataset_info.json updated by `entries` (added or replaced), every other
    registration kept; `unregister` {name: file_name} removes a name only while it still points at that file (ours)."""
    path = Path(output_dir) / DATASET_INFO
    with locked_dataset_info(output_dir) as info:
        for name, file_name in (unregister or {}).items():
            if isinstance(info.get(name), dict) and info[name].get("file_name") == file_name:
                del info[name]
        info.update(entries)
        outs.write_json(path, info)
        outs.commit()
    return path


def register(output_dir: str | os.PathLike, entries: dict[str, dict]) -> Path:
    """Adds or replaces `entries` in output_dir/dataset_info.json, keeping every other registration."""
    with OutputSet() as outs:
        return commit_registrations(outs, output_dir, entries)
