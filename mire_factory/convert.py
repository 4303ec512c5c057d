"""MIRE records to LLaMA-Factory ShareGPT (or ms-swift JSONL) files, with a deterministic stratified split."""

from __future__ import annotations

import math
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .augment import AUGMENT_KEY, DEFAULT_MASK_RATIO, AugmentedRecord, augment_records
from .augment import registration as augment_registration
from .corrections import CORRECTIONS_KEY, apply_corrections, read_corrections
from .dataset_info import (
    SCREENSHOT_TEXT_KEY,
    TASK_MAX_PIXELS_KEY,
    commit_registrations,
    dataset_name,
    entry_caps,
    entry_variant,
    format_caps,
    read_dataset_info,
)
from .image_copies import (
    DERIVED_DIR,
    MIN_CAP,
    ImageCopy,
    Op,
    cap_ops,
    capped_size,
    qwen2_vl_tokens,
    write_copies,
)
from .io import MireInputError, OutputSet, output_lock, problem
from .prompt_variants import (
    DEFAULT_PROMPT_VARIANT,
    PROMPT_VARIANTS,
    SCREENSHOT_TEXT,
    PromptVariant,
    get_prompt_variant,
)
from .records import IMAGE_PLACEHOLDER, Kind, MireRecord, read_mire_file
from .screenshot_text import DEFAULT_INFO_MAX_TOKENS, ScreenshotText
from .sharegpt import chat_row, sharegpt_entry
from .taxonomy import LABELS, TASKS

FORMATS = ("sharegpt", "swift")
TASK_CHOICES = ("all", *TASKS)


def user_content(record: MireRecord) -> str:
    """The MIRE instruction with its <image> placeholders in place; a non-empty `input` follows on a new line,
    as LLaMA-Factory's alpaca reader joins instruction and input."""
    return record.instruction + ("\n" + record.input if record.input else "")


def image_path_maker(image_dir: str | os.PathLike, output_dir: str | os.PathLike | None):
    # One relpath for the directory instead of one per image: 10,000s of images convert in well under a second.
    base = os.path.abspath(image_dir)
    prefix = base if output_dir is None else os.path.relpath(base, os.path.abspath(output_dir))

    def make(name: str) -> str:
        return os.path.normpath(os.path.join(prefix, name)) if prefix != "." else os.path.normpath(name)

    return make


def records_to_sharegpt(
    records: list[MireRecord], image_dir: str | os.PathLike, output_dir: str | os.PathLike,
    variant: PromptVariant | None = None, contexts: list[str] | None = None,
    image_paths: list[list[str]] | None = None,
) -> list[dict]:
    """ShareGPT rows, the turns written by the prompt variant (default plain; `contexts`: each record's text for a
    variant that inserts some). Image paths are relative to output_dir, because LLaMA-Factory joins each with
    `media_dir`, which defaults to `dataset_dir`: point dataset_dir at output_dir. Unlabelled records get an empty
    assistant turn, so that LLaMA-Factory keeps them (predict). `image_paths`: each record's image paths as written,
    when some are not the records' own (derived copies); default, the records' images under image_dir."""
    return _rows(records, image_path_maker(image_dir, output_dir), variant or get_prompt_variant(None), contexts,
                 image_paths)


def records_to_swift(records: list[MireRecord], image_dir: str | os.PathLike,
                     variant: PromptVariant | None = None, contexts: list[str] | None = None,
                     image_paths: list[list[str]] | None = None) -> list[dict]:
    """ms-swift's messages/images rows; absolute image paths, since ms-swift does not join them with a folder."""
    return _rows(records, image_path_maker(image_dir, None), variant or get_prompt_variant(None), contexts,
                 image_paths)


def _rows(records: list[MireRecord], path_of, variant: PromptVariant, contexts: list[str] | None,
          image_paths: list[list[str]] | None = None) -> list[dict]:
    contexts = contexts if contexts is not None else [None] * len(records)
    image_paths = image_paths if image_paths is not None else [[path_of(name) for name in r.images] for r in records]
    return [chat_row(variant.user_turn(user_content(r), r.task, context), variant.answer(r.output) if r.output else "",
                     paths, row_id=r.id)
            for r, context, paths in zip(records, contexts, image_paths, strict=True)]


def stratified_split(
    records: list[MireRecord], val_size: float, seed: int = 42
) -> tuple[list[MireRecord], list[MireRecord]]:
    """Deterministic split stratified by (task, label): round(n * val_size) validation records overall, given out
    by largest remainder, and every class with >= 2 samples keeps at least one in train (singletons stay in
    train). Both halves keep the input order."""
    if not 0 <= val_size < 1:
        raise ValueError(f"val_size must be in [0, 1), got {val_size}")
    if val_size == 0:
        return list(records), []
    groups: dict[tuple, list[MireRecord]] = defaultdict(list)
    for r in records:
        groups[(r.task, r.output or "")].append(r)
    rng = random.Random(seed)
    keys = sorted(groups)
    quota = {k: len(groups[k]) * val_size for k in keys}
    cap = {k: len(groups[k]) - 1 for k in keys}
    alloc = {k: min(math.floor(quota[k]), cap[k]) for k in keys}
    remaining = round(len(records) * val_size) - sum(alloc.values())
    tie = {k: rng.random() for k in keys}
    order = sorted(keys, key=lambda k: (-(quota[k] - math.floor(quota[k])), -len(groups[k]), tie[k]))
    while remaining > 0:
        gave = False
        for k in order:
            if remaining > 0 and alloc[k] < cap[k]:
                alloc[k] += 1
                remaining -= 1
                gave = True
        if not gave:
            break
    val_ids: set[int] = set()
    for k in keys:
        members = list(groups[k])
        rng.shuffle(members)
        val_ids.update(id(r) for r in members[: alloc[k]])
    train = [r for r in records if id(r) not in val_ids]
    val = [r for r in records if id(r) in val_ids]
    return train, val


def summary_text(splits: dict[str, list[MireRecord]], files: dict[str, Path]) -> str:
    lines = []
    for name, recs in splits.items():
        tasks = Counter(r.task for r in recs)
        lines.append(
            f"{name}: {len(recs)} records ({tasks.get('image', 0)} image, {tasks.get('dialogue', 0)} dialogue), "
            f"{sum(len(r.images) for r in recs)} images -> {files[name]}"
        )
    names = list(splits)
    everything = [r for recs in splits.values() for r in recs]
    if any(r.output for r in everything):
        lines.append("per class (" + " / ".join(names) + "):")
        counts = {name: Counter((r.task, r.output) for r in recs) for name, recs in splits.items()}
        for task in TASKS:
            for label in LABELS[task]:
                row = [counts[name].get((task, label), 0) for name in names]
                if any(row):
                    lines.append(f"  {task:8s} {label}: " + " / ".join(map(str, row)))
    histogram = Counter(len(r.images) for r in everything)
    lines.append("images per record: " + ", ".join(f"{k}: {histogram[k]}" for k in sorted(histogram)))
    return "\n".join(lines)


@dataclass
class ConvertResult:
    splits: dict[str, list[MireRecord]]  # dataset name -> records
    files: dict[str, Path]  # dataset name -> written file
    dataset_info: Path | None
    summary: str = ""
    warnings: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # splits of an earlier run this one no longer writes
    augmented: int = 0  # augmented rows added to the train split


def convert(
    input_file: str | os.PathLike,
    image_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    val_size: float = 0.1,
    seed: int = 42,
    task: str = "all",
    fmt: str = "sharegpt",
    kind: Kind = "auto",
    decode_images: bool = True,
    prompt_variant: str = DEFAULT_PROMPT_VARIANT,
    info_file: str | os.PathLike | None = None,
    info_max_tokens: int = DEFAULT_INFO_MAX_TOKENS,
    corrections_file: str | os.PathLike | None = None,
    augment: int = 0,
    augment_mask_ratio: float = DEFAULT_MASK_RATIO,
    task_max_pixels: dict[str, int | None] | None = None,
) -> ConvertResult:
    """Checks everything first; on bad input raises MireInputError before writing any file.

    A train file (every record labelled) becomes train + val splits, a test file one test split; every split is
    written with the same prompt variant, recorded in its registration. A screenshot-text variant takes each
    record's image text from `info_file` (tools.extract_info), at most `info_max_tokens` tokens per record. The
    accepted lines of `corrections_file` (corrections.py) relabel their records before the split; each split's
    registration lists those applied to it. `augment` N > 0 adds N augmented copies of every train-split record
    (augment.py: transformed images, a dialogue's customer turns masked at `augment_mask_ratio`), a train file only;
    their images are image_copies files in output_dir/derived_images. `task_max_pixels` {task: P} shrinks that task's
    images over P pixels as LLaMA-Factory's image_max_pixels P would (image_copies `max_pixels`) into derived
    copies, in every split: training and inference read the same files; registered per split."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if task not in TASK_CHOICES:
        raise ValueError(f"task must be one of {TASK_CHOICES}, got {task!r}")
    variant = variant_with_info(prompt_variant, info_file)
    if augment < 0:
        raise MireInputError(f"--augment: expected a number of copies >= 0, got {augment}")
    if not 0 <= augment_mask_ratio < 1:
        raise MireInputError(f"--augment_mask_ratio: expected a share in [0, 1), got {augment_mask_ratio}")
    caps = {t: cap for t, cap in (task_max_pixels or {}).items() if cap is not None}
    for t, cap in caps.items():
        if t not in TASKS:
            raise ValueError(f"task_max_pixels: unknown task {t!r}")
        if cap < MIN_CAP:
            raise MireInputError(f"--{CAP_FLAGS[t]}: expected at least {MIN_CAP} pixels (56x56, Qwen2-VL's "
                                 f"smallest image), got {cap}")
    screenshot_text = ScreenshotText(info_file, info_max_tokens) if info_file is not None else None
    mire = read_mire_file(input_file, image_dir, kind=kind, decode_images=decode_images)
    if augment and mire.kind != "train":
        raise MireInputError(problem(input_file, None, None, f"--augment {augment}: a {mire.kind} file gets no "
                                     "augmented copies (only a train file's train split does); leave --augment out"))
    records = mire.records
    bad_input = [
        problem(input_file, r.id, "input", f"holds {IMAGE_PLACEHOLDER}; images belong in the instruction")
        for r in records
        if IMAGE_PLACEHOLDER in r.input
    ]
    if bad_input:
        raise MireInputError(bad_input)
    applied = None
    if corrections_file is not None:
        records, applied = apply_corrections(records, read_corrections(corrections_file), corrections_file)
    if task != "all":
        records = [r for r in records if r.task == task]
        if not records:
            raise MireInputError(problem(input_file, None, None, f"no {task} records (--task {task})"))
    contexts = dict(zip((r.id for r in records), screenshot_text.contexts(records, image_dir, input_file),
                        strict=True)) if screenshot_text is not None else None
    output_dir = Path(output_dir)
    warnings: list[str] = []
    existing = read_dataset_info(output_dir) if fmt == "sharegpt" else {}  # a broken one stops us before writing

    augmented: list[AugmentedRecord] = []
    if mire.kind == "train":
        group = ("train", "val")
        train, val = stratified_split(records, val_size, seed)
        augmented = augment_records(train, augment, seed, augment_mask_ratio) if augment else []
        splits = {dataset_name("train", task): train}
        if val:
            splits[dataset_name("val", task)] = val
        elif val_size > 0:
            warnings.append(f"val_size {val_size} gives no validation record for {len(records)} records")
    else:
        group = ("test",)
        splits = {dataset_name("test", task): records}

    warnings += _other_variants(existing, output_dir, variant, task, set(splits))
    warnings += _other_caps(existing, output_dir, caps, task, set(splits))
    ext = "json" if fmt == "sharegpt" else "jsonl"
    files = {name: output_dir / f"{name}.{ext}" for name in splits}
    # Splits of this kind of file that this run no longer writes (a val split before, --val_size 0 now) go, with
    # their registrations: a recipe's eval_dataset must not go on reading an old split.
    stale = [dataset_name(split, task) for split in group if dataset_name(split, task) not in splits]
    # Every split's rows: (record, the id its screenshot text is under, per image a derived copy or None: the source)
    source_dir = Path(os.path.abspath(image_dir))

    def plan(record: MireRecord, extra: list[tuple[Op, ...]] | None = None) -> list[ImageCopy | None]:
        sizes = _sizes(record, source_dir)
        chains = [cap_ops(sizes[i], caps.get(record.task)) + (tuple(extra[i]) if extra else ())
                  for i in range(len(record.images))]
        return [ImageCopy(source_dir / name, ops) if ops else None for name, ops in zip(record.images, chains,
                                                                                          strict=True)]

    rows = {name: [(r, r.id, plan(r)) for r in recs] for name, recs in splits.items()}
    if augmented:
        rows[dataset_name("train", task)] += [(a.record, a.source_id, plan(a.record, a.image_ops)) for a in augmented]
    info = None
    derived = None
    # One writer per set of files; a train and a test file, or two tasks, convert into one folder side by side.
    with output_lock(output_dir / dataset_name(group[0], task), what="another tools.convert is writing this split"), \
            OutputSet() as outs:
        copies = [c for split_rows in rows.values() for *_, plans in split_rows for c in plans if c is not None]
        if copies:
            derived = write_copies(copies, output_dir, outs)
        path_of = image_path_maker(image_dir, output_dir if fmt == "sharegpt" else None)
        out_abs = os.path.abspath(output_dir)

        def written_path(name: str, copy: ImageCopy | None) -> str:
            if copy is None:
                return path_of(name)
            target = derived.paths[copy]
            return os.path.relpath(target, out_abs) if fmt == "sharegpt" else str(target)

        for name, split_rows in rows.items():
            recs = [r for r, _, _ in split_rows]
            texts = [contexts[key] for _, key, _ in split_rows] if contexts is not None else None
            paths = [[written_path(n, c) for n, c in zip(r.images, plans, strict=True)] for r, _, plans in split_rows]
            if fmt == "sharegpt":
                outs.write_json(files[name], records_to_sharegpt(recs, image_dir, output_dir, variant, texts, paths))
            else:
                outs.write_jsonl(files[name], records_to_swift(recs, image_dir, variant, texts, paths))
        for name in stale:
            outs.remove(output_dir / f"{name}.{ext}")
        removed = [name for name in stale if (output_dir / f"{name}.{ext}").is_file()]
        if fmt == "sharegpt":
            entries = {name: sharegpt_entry(files[name].name, variant.name) for name in splits}
            if screenshot_text is not None:
                for entry in entries.values():
                    entry[SCREENSHOT_TEXT_KEY] = screenshot_text.registration()
            if applied is not None:
                for name, entry in entries.items():
                    entry[CORRECTIONS_KEY] = applied.registration({r.id for r in splits[name]})
            if caps:
                for entry in entries.values():
                    entry[TASK_MAX_PIXELS_KEY] = {t: caps.get(t) for t in TASKS}
            if augmented:
                entries[dataset_name("train", task)][AUGMENT_KEY] = augment_registration(
                    augment, len(augmented), seed, augment_mask_ratio)
            info = commit_registrations(outs, output_dir, entries, unregister={name: f"{name}.{ext}" for name in stale})
    summary = summary_text(splits, files)
    if screenshot_text is not None:
        with_images = sum(1 for text in contexts.values() if text)
        summary += (f"\nscreenshot text from {info_file}: {with_images} records with images, "
                    f"{screenshot_text.truncated_records} cut to --info_max_tokens {info_max_tokens} "
                    f"({screenshot_text.dropped_lines} lines dropped)")
    if applied is not None:
        summary += "\n" + applied.summary()
    if augmented:
        masked = sum(1 for a in augmented if a.record.task == "dialogue")
        summary += (f"\naugmented: {augment} cop{'y' if augment == 1 else 'ies'} of each of the "
                    f"{len(augmented) // augment} train records: "
                    f"{len(augmented)} more rows in {dataset_name('train', task)} ({masked} dialogues with masked "
                    f"customer turns; seed {seed})")
    if caps:
        summary += "\n" + _caps_summary(splits, caps, source_dir)
    if derived is not None:
        summary += (f"\nderived images in {output_dir / DERIVED_DIR}: {len(set(derived.paths.values()))} "
                    f"({derived.written} written, {derived.reused} of an earlier run kept)")
    return ConvertResult(splits, files, info, summary, warnings, removed, len(augmented))


CAP_FLAGS = {"image": "scene_image_max_pixels", "dialogue": "dialogue_image_max_pixels"}


def variant_with_info(prompt_variant: str, info_file: str | os.PathLike | None) -> PromptVariant:
    """The prompt variant, refused when it needs an --info_file not given, or gets one it does not use."""
    try:
        variant = get_prompt_variant(prompt_variant)
    except ValueError as exc:
        raise MireInputError(f"--prompt_variant: {exc}") from None
    if variant.context and info_file is None:
        raise MireInputError(f"--prompt_variant {variant.name}: needs --info_file, the text of every image "
                             "(tools.extract_info's output for these images)")
    if info_file is not None and variant.context != SCREENSHOT_TEXT:
        names = ", ".join(n for n, v in PROMPT_VARIANTS.items() if v.context == SCREENSHOT_TEXT)
        raise MireInputError(f"--info_file: prompt variant {variant.name} puts no image text in the prompt; choose "
                             f"one that does ({names})")
    return variant


def _sizes(record: MireRecord, source_dir: Path) -> list[tuple[int, int]]:
    """(width, height) of each image: from the check's header reads, else read now."""
    if len(record.image_sizes) == len(record.images):
        return record.image_sizes
    from .records import image_size

    return [image_size(source_dir / name) for name in record.images]


def _caps_summary(splits: dict[str, list[MireRecord]], caps: dict[str, int], source_dir: Path) -> str:
    """Per capped task: how many images the cap shrank, and the image tokens of its largest image before and after
    (Qwen2-VL's count before the recipe's image_max_pixels, which applies on top)."""
    lines = []
    for t in TASKS:
        if t not in caps:
            continue
        sizes = [size for recs in splits.values() for r in recs if r.task == t for size in _sizes(r, source_dir)]
        if not sizes:
            continue
        over = sum(1 for w, h in sizes if w * h > caps[t])
        before = max(qwen2_vl_tokens(size) for size in sizes)
        after = max(qwen2_vl_tokens(capped_size(*size, caps[t])) for size in sizes)
        lines.append(f"--{CAP_FLAGS[t]} {caps[t]}: {over} of {len(sizes)} {t}-task images shrunk; image tokens of "
                     f"the largest: {before} -> {after} (the recipe's image_max_pixels applies on top)")
    return "\n".join(lines)


def _other_caps(existing: dict, output_dir: Path, caps: dict[str, int], task: str, writing: set[str]) -> list[str]:
    """Warnings for the other MIRE splits of the task selection registered in output_dir with other per-task pixel
    caps: a model trained on one and asked the other sees images of other sizes than in training."""
    ours = {dataset_name(split, task) for split in ("train", "val", "test")} - writing
    mine = {t: caps.get(t) for t in TASKS}
    out = []
    for name in sorted(ours & set(existing)):
        if isinstance(existing[name], dict):
            other = entry_caps(existing[name], output_dir / "dataset_info.json", name)
            if other != mine:
                out.append(f"{name} in {output_dir} was converted with per-task pixel caps {format_caps(other)}, this "
                           f"run with {format_caps(mine)}: convert every split with the same --scene_image_max_pixels "
                           "and --dialogue_image_max_pixels, so that inference sees the pixels of training")
    return out


def _other_variants(existing: dict, output_dir: Path, variant: PromptVariant, task: str,
                    writing: set[str]) -> list[str]:
    """Warnings for the other MIRE splits of the task selection, registered in output_dir with another variant: a
    model trained on one and asked the other sees prompts it was not trained on (tools.vllm_infer refuses that)."""
    ours = {dataset_name(split, task) for split in ("train", "val", "test")} - writing
    out = []
    for name in sorted(ours & set(existing)):
        if isinstance(existing[name], dict):
            other = entry_variant(existing[name], output_dir / "dataset_info.json", name)
            if other.name != variant.name:
                out.append(f"{name} in {output_dir} is registered with prompt variant {other.name!r}, this run writes "
                           f"{variant.name!r}: convert every split with the same --prompt_variant")
    return out
