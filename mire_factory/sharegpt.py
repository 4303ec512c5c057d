"""ShareGPT files as LLaMA-Factory reads them: the one writer (a row and its dataset_info.json registration, for
tools.convert, tools.merge_cot and tools.generate's export) and the one reader (inference, tools.merge_cot).

The reader is LLaMA-Factory's own: its parser (`get_dataset_list`: the registration's columns and tags, with its
defaults) and its converter (each row to the normal form `_prompt`/`_response`/`_system`/`_images` that training
tokenizes, image paths joined with `media_dir` as `DataArguments` defaults it), so a row reads here exactly as
training reads it. What is ours is the checking first: one line per bad row naming the file, the record and the field
(LLaMA-Factory logs a warning and skips such a row), then a `records.MireRecord` per row.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from .answers import extract_answer
from .dataset_info import PROMPT_VARIANT_KEY, dataset_entry
from .io import MireInputError, problem, read_json, read_jsonl
from .prompt_variants import DEFAULT_PROMPT_VARIANT
from .records import IMAGE_PLACEHOLDER, MireRecord
from .taxonomy import LABELS, detect_task, normalize_label

# ---------------------------------------------------------------- writing


def sharegpt_entry(file_name: str, prompt_variant: str | None = DEFAULT_PROMPT_VARIANT) -> dict:
    """How LLaMA-Factory reads a file of chat_rows: messages + images, role/content tags; plus the prompt variant
    the file's turns were written with (None: not MIRE records, no variant of ours wrote the turns)."""
    return {
        "file_name": file_name,
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        # LLaMA-Factory reads a leading system turn only when the entry names its tag (no default once `tags` is given)
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                 "system_tag": "system"},
        **({PROMPT_VARIANT_KEY: prompt_variant} if prompt_variant is not None else {}),
    }


def chat_row(user: str, assistant: str, images: list[str], system: str | None = None,
             row_id: str | None = None, followup: Sequence[tuple[str, str]] = ()) -> dict:
    """One row of both formats: LLaMA-Factory's ShareGPT (registered with sharegpt_entry) and ms-swift's
    `messages`/`images`; `<image>` placeholders stay in the user turn, `images` are the paths as the file gives them
    (LLaMA-Factory: relative to its dataset_dir). A test row gets an empty assistant turn, so that LLaMA-Factory keeps
    it (predict). `followup`: further (user, assistant) exchanges after the first, without images (tools.merge_cot's
    second_turn layout)."""
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    for question, answer in followup:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    row = {"id": row_id} if row_id is not None else {}
    return {**row, "messages": messages, "images": list(images)}


# ---------------------------------------------------------------- reading


def _load_rows(path: Path) -> list:
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    rows = read_json(path)
    if not isinstance(rows, list):
        raise MireInputError(problem(path, None, None, f"expected a JSON list of records, got {type(rows).__name__}"))
    return rows


def _lf_reader(dataset: str, entry: dict, dataset_dir: Path, info_path: Path):
    """LLaMA-Factory's DatasetAttr of the registration and its converter for it."""
    # Imported here: LLaMA-Factory's data package loads torch, peft and datasets (seconds), which writers never need.
    from llamafactory.data.converter import get_dataset_converter
    from llamafactory.data.parser import get_dataset_list
    from llamafactory.hparams import DataArguments

    (attr,) = get_dataset_list([dataset], {dataset: entry})
    if attr.load_from != "file":
        raise MireInputError(problem(info_path, None, dataset, f"registered from {attr.load_from} ({attr.dataset_name}); "
                                                               "expected a local file (file_name only)"))
    return attr, get_dataset_converter(attr.formatting, attr, DataArguments(dataset_dir=str(dataset_dir)))


def read_sharegpt(dataset: str, dataset_dir: str | os.PathLike, *, check_images: bool = True,
                  train: bool = False) -> list[MireRecord]:
    """The records of a ShareGPT dataset registered in dataset_dir/dataset_info.json; MireInputError with one line
    per bad row. A row is an optional system turn, a user turn and an optional assistant turn (a test row).

    check_images: every image must be a file (paths as LLaMA-Factory resolves them). train: every row carries its own
    id and a known gold label in its assistant turn (a label or a CoT answer naming one), as tools.convert writes a
    train split."""
    dataset_dir = Path(dataset_dir)
    info_path = dataset_dir / "dataset_info.json"
    entry = dataset_entry(dataset, dataset_dir)
    path = dataset_dir / entry["file_name"]
    rows = _load_rows(path)
    attr, converter = _lf_reader(dataset, entry, dataset_dir, info_path)
    media_dir = converter.data_args.media_dir
    messages_col, content = attr.messages, attr.content_tag
    records, problems, seen = [], [], set()
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            problems.append(problem(path, index, None, f"expected a JSON object, got {type(row).__name__}"))
            continue
        rid = row.get("id", None if train else str(index))
        ref = rid if isinstance(rid, str) and rid else index
        if not isinstance(rid, str) or not rid or rid in seen:
            problems.append(problem(path, ref, "id", f"expected a unique non-empty string, got {rid!r}"))
            continue
        seen.add(rid)
        messages = row.get(messages_col)
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            problems.append(problem(path, ref, messages_col, "expected a non-empty list of messages"))
            continue
        roles = [m.get(attr.role_tag) for m in messages]
        first = 1 if attr.system_tag is not None and roles[0] == attr.system_tag else 0  # a leading system turn
        if roles[first:] not in ([attr.user_tag], [attr.user_tag, attr.assistant_tag]):
            problems.append(problem(path, ref, messages_col, f"expected [user] or [user, assistant], got {roles}"))
            continue
        if not all(isinstance(m.get(content), str) for m in messages):
            problems.append(problem(path, ref, messages_col, "message content must be a string"))
            continue
        user = messages[first][content]
        images = row.get(attr.images, []) if attr.images else []
        if not isinstance(images, list) or not all(isinstance(x, str) and "\x00" not in x for x in images):
            problems.append(problem(path, ref, attr.images, "expected a list of image paths"))
            continue
        try:
            task = detect_task(user)
        except ValueError as exc:
            problems.append(problem(path, ref, f"{messages_col}[{first}].{content}", str(exc)))
            continue
        if user.count(IMAGE_PLACEHOLDER) != len(images):
            problems.append(problem(path, ref, attr.images, f"{user.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} "
                                                             f"placeholders but {len(images)} images"))
            continue
        if check_images:
            missing = [k for k, name in enumerate(images) if not os.path.isfile(os.path.join(media_dir, name))]
            for k in missing:
                problems.append(problem(path, ref, f"{attr.images}[{k}]",
                                        f"image not found: {os.path.join(media_dir, images[k])}"))
            if missing:
                continue
        if len(messages) == first + 1:  # a test row without an assistant turn reads as one with an empty answer
            messages = [*messages, {attr.role_tag: attr.assistant_tag, content: ""}]
        try:
            normal = converter({**row, messages_col: messages, **({attr.images: images} if attr.images else {})})
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            # a registration may name columns that are not checked above (tools, videos, kto_tag, ...)
            problems.append(problem(path, ref, None, f"LLaMA-Factory's {attr.formatting} converter cannot read it "
                                                     f"({type(exc).__name__}: {exc})"))
            continue
        if len(normal["_prompt"]) != 1 or len(normal["_response"]) != 1:
            problems.append(problem(path, ref, messages_col, "LLaMA-Factory reads no single user and assistant turn "
                                                             f"from it (registration {json.dumps(entry)[:200]})"))
            continue
        if not isinstance(normal["_system"], str):
            problems.append(problem(path, ref, attr.system, f"expected a string, got {type(normal['_system']).__name__}"))
            continue
        response = normal["_response"][0]["content"]
        label = normalize_label(extract_answer(response)) if response.strip() else ""
        if train and label not in LABELS[task]:
            where = f"{messages_col}[{first + 1}].{content}"
            problems.append(problem(path, ref, where, f"unknown label {label!r} for the {task} task" if label
                                    else "no gold label (a test file?)"))
            continue
        records.append(MireRecord(id=rid, instruction=normal["_prompt"][0]["content"], images=normal["_images"] or [],
                                  task=task, output=label if label in LABELS[task] else None, index=index,
                                  system=normal["_system"], response=response))
    if problems:
        raise MireInputError(problems)
    if not records:
        raise MireInputError(problem(path, None, None, "no records"))
    return records
