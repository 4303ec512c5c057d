"""LLaMA-Factory's dataset_info.json: the registration entry of a MIRE ShareGPT file, and an atomic merge under a
lock (read-modify-write: two tools registering into one folder at once both keep their entries)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from .io import MireInputError, OutputSet, output_lock, problem, read_json

DATASET_INFO = "dataset_info.json"
SPLITS = ("train", "val", "test")


def sharegpt_entry(file_name: str) -> dict:
    """How LLaMA-Factory reads a file written by tools.convert: messages + images, role/content tags."""
    return {
        "file_name": file_name,
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
    }


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
