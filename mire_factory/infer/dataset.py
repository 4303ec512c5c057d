"""Reading a dataset the way LLaMA-Factory registers it: dataset_info.json, the file, the columns and tags."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..dataset_info import DATASET_INFO
from ..io import MireInputError, problem, read_json, read_jsonl
from ..taxonomy import Task, detect_task


@dataclass
class InferRecord:
    id: str
    index: int
    content: str  # the user turn, with <image> placeholders
    images: list[str]  # resolved paths, as LLaMA-Factory resolves them: os.path.join(dataset_dir, path)
    task: Task
    label: str = ""  # the assistant turn as written (gold label, CoT JSON) or "" for test data
    system: str | None = None
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) from headers


def _load_rows(path: Path) -> list:
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    rows = read_json(path)
    if not isinstance(rows, list):
        raise MireInputError(problem(path, None, None, f"expected a JSON list of records, got {type(rows).__name__}"))
    return rows


def dataset_entry(dataset: str, dataset_dir: str | os.PathLike) -> dict:
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
        if not isinstance(entry.get(key, {}), dict) or not all(isinstance(v, str | None) for v in entry.get(key, {}).values()):
            raise MireInputError(problem(info_path, None, f"{dataset}.{key}", "expected an object of names"))
    return entry


def load_dataset(dataset: str, dataset_dir: str | os.PathLike) -> list[InferRecord]:
    """The records of a registered sharegpt dataset; one MireInputError line per bad record."""
    dataset_dir = Path(dataset_dir)
    entry = dataset_entry(dataset, dataset_dir)
    columns = {"messages": "conversations", "images": None, "system": None, **entry.get("columns", {})}
    tags = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
            **entry.get("tags", {})}
    path = dataset_dir / entry["file_name"]
    rows = _load_rows(path)
    records, problems, seen = [], [], set()
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            problems.append(problem(path, index, None, f"expected a JSON object, got {type(row).__name__}"))
            continue
        rid = row.get("id", str(index))
        ref = rid if isinstance(rid, str) else index
        if not isinstance(rid, str) or not rid or rid in seen:
            problems.append(problem(path, ref, "id", f"expected a unique non-empty string, got {rid!r}"))
            continue
        seen.add(rid)
        messages = row.get(columns["messages"])
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            problems.append(problem(path, ref, columns["messages"], "expected a non-empty list of messages"))
            continue
        roles = [m.get(tags["role_tag"]) for m in messages]
        if roles[0] != tags["user_tag"] or len(messages) > 2 or (len(messages) == 2 and roles[1] != tags["assistant_tag"]):
            problems.append(problem(path, ref, columns["messages"], f"expected [user] or [user, assistant], got {roles}"))
            continue
        content = messages[0].get(tags["content_tag"])
        label = messages[1].get(tags["content_tag"], "") if len(messages) == 2 else ""
        if not isinstance(content, str) or not isinstance(label, str):
            problems.append(problem(path, ref, columns["messages"], "message content must be a string"))
            continue
        images = row.get(columns["images"], []) if columns["images"] else []
        if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
            problems.append(problem(path, ref, columns["images"], "expected a list of image paths"))
            continue
        if content.count("<image>") != len(images):
            problems.append(problem(path, ref, columns["images"],
                                    f"{content.count('<image>')} <image> placeholders but {len(images)} images"))
            continue
        try:
            task = detect_task(content)
        except ValueError as exc:
            problems.append(problem(path, ref, columns["messages"], str(exc)))
            continue
        resolved = [os.path.join(dataset_dir, name) for name in images]
        missing = [k for k, p in enumerate(resolved) if not os.path.isfile(p)]
        for k in missing:
            problems.append(problem(path, ref, f"{columns['images']}[{k}]", f"image not found: {resolved[k]}"))
        if missing:
            continue
        system = row.get(columns["system"]) if columns["system"] else None
        records.append(InferRecord(id=rid, index=index, content=content, images=resolved, task=task,
                                   label=label, system=system))
    if problems:
        raise MireInputError(problems)
    if not records:
        raise MireInputError(problem(path, None, None, "no records"))
    return records
