"""LLaMA-Factory's dataset_info.json: reading registrations back (a dataset's entry, the prompt variant a MIRE
ShareGPT file was written with; the entry itself is written by sharegpt.sharegpt_entry) and an atomic merge under a
lock (read-modify-write: two tools registering into one folder at once both keep their entries)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from .io import MireInputError, OutputSet, output_lock, problem, read_json
from .prompt_variants import PromptVariant, get_prompt_variant

DATASET_INFO = "dataset_info.json"
SPLITS = ("train", "val", "test")
# Our key in a registration entry; LLaMA-Factory's DatasetAttr.join reads only the keys it knows and ignores it.
PROMPT_VARIANT_KEY = "mire_prompt_variant"
# tools.merge_cot's layout of a file whose rows carry the reason as a second exchange (cot.SECOND_TURN); absent for
# single-exchange files. Inference needs only the prompt variant (the first exchange's); this says what the rows are.
COT_LAYOUT_KEY = "mire_cot_layout"
# A screenshot-text variant's source: the info file, its token budget and origin, and how many records it cut.
SCREENSHOT_TEXT_KEY = "mire_screenshot_text"
# Per-task pixel caps the split's images were shrunk to (tools.convert --scene_image_max_pixels and
# --dialogue_image_max_pixels): {"image": P or null, "dialogue": P or null}; absent: none.
TASK_MAX_PIXELS_KEY = "mire_image_max_pixels"
CAP_TASKS = ("image", "dialogue")


def entry_caps(entry: dict, where: str | os.PathLike, name: str) -> dict[str, int | None]:
    """The per-task pixel caps a registration records, every task present (None: no cap)."""
    caps = entry.get(TASK_MAX_PIXELS_KEY) or {}
    if not isinstance(caps, dict) or not all(isinstance(caps.get(t), int | None) for t in CAP_TASKS):
        raise MireInputError(problem(where, None, f"{name}.{TASK_MAX_PIXELS_KEY}",
                                     f"expected {{task: pixels or null}}, got {caps!r}"))
    return {t: caps.get(t) for t in CAP_TASKS}


def format_caps(caps: dict[str, int | None]) -> str:
    """'image=P,dialogue=P' (tasks without a cap left out), or 'none'."""
    return ",".join(f"{t}={caps[t]}" for t in CAP_TASKS if caps.get(t) is not None) or "none"


def parse_caps(text: str) -> dict[str, int | None]:
    """format_caps' text back; ValueError naming what is wrong."""
    caps: dict[str, int | None] = {t: None for t in CAP_TASKS}
    if text.strip() == "none":
        return caps
    for part in text.split(","):
        task, _, value = part.partition("=")
        if task.strip() not in CAP_TASKS or not value.strip().isdigit():
            raise ValueError(f"expected 'none' or 'image=P,dialogue=P' (either may be left out), got {text!r}")
        caps[task.strip()] = int(value)
    return caps


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


def dataset_entry(dataset: str, dataset_dir: str | os.PathLike) -> dict:
    """The registration of `dataset` in dataset_dir/dataset_info.json, checked to be a local ShareGPT file whose
    columns and tags are names (what LLaMA-Factory's DatasetAttr.join reads from it)."""
    info_path = Path(dataset_dir) / DATASET_INFO
    info = read_json(info_path)
    if not isinstance(info, dict) or dataset not in info:
        names = sorted(info) if isinstance(info, dict) else []
        raise MireInputError(problem(info_path, None, dataset, f"dataset not registered (registered: {names})"))
    entry = info[dataset]
    if not isinstance(entry, dict) or entry.get("formatting", "alpaca") != "sharegpt" \
            or not isinstance(entry.get("file_name"), str) or "\x00" in entry["file_name"]:
        raise MireInputError(problem(info_path, None, dataset, "expected a sharegpt dataset with a file_name"))
    for key in ("columns", "tags"):
        names = entry.get(key, {})
        if not isinstance(names, dict) or not all(isinstance(v, str | None) for v in names.values()):
            raise MireInputError(problem(info_path, None, f"{dataset}.{key}", "expected an object of names"))
    return entry


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
