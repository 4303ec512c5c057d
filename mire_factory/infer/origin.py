"""What made a predictions file: the model, a fingerprint of its weights, the prompt variant and the settings that
shape its answers, kept in PATH.meta.json beside it. A resume must come from the same origin: predictions of two
models (or of two cutoff_len) in one file would score as one model that is neither.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..io import MireInputError, problem, read_json, write_json_atomic

# Settings that change the answers; backend, batch size, --compile and sharding only change how fast they come.
IDENTITY_SETTINGS = ("dataset", "template", "cutoff_len", "image_max_pixels", "image_min_pixels",
                     "max_images_per_prompt", "max_new_tokens", "constrained")
RUN_SETTINGS = ("backend", "batch_size", "compile", "num_shards", "shard_index", "config")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
CONFIG_FILES = ("config.json", "adapter_config.json")
EDGE_BYTES = 1 << 20


def meta_path(save_path: str | os.PathLike) -> Path:
    return Path(f"{save_path}.meta.json")


def weights_fingerprint(model: str | None) -> str | None:
    """sha256 over a local model directory's config, weight index and, per weight file, its size and its first and
    last MiB (hashing 15 GB of 7B weights would take minutes; a trained checkpoint differs from its base in every
    tensor, so its edges differ too). None for a hub name: the name is all there is to record."""
    if not model or not Path(model).is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(Path(model).iterdir()):
        if path.name in CONFIG_FILES or path.name.endswith(".index.json"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        elif path.suffix in WEIGHT_SUFFIXES and path.is_file():
            size = path.stat().st_size
            digest.update(f"{path.name}\0{size}\0".encode())
            with open(path, "rb") as f:
                digest.update(f.read(EDGE_BYTES))
                f.seek(max(0, size - EDGE_BYTES))
                digest.update(f.read(EDGE_BYTES))
    return digest.hexdigest()


def _where(model: str | None) -> str | None:
    return str(Path(model).resolve()) if model and Path(model).exists() else model


def make_origin(args, variant, dataset_caps: str = "none") -> dict:
    """The identity of a run's predictions (compared on resume) and how it ran (recorded only). `dataset_caps`: the
    per-task pixel caps the dataset was converted with (dataset_info.format_caps), part of the identity when any."""
    return {
        "origin": {
            "model_name_or_path": _where(args.model_name_or_path),
            "weights": weights_fingerprint(args.model_name_or_path),
            "adapter_name_or_path": _where(args.adapter_name_or_path),
            "adapter_weights": weights_fingerprint(args.adapter_name_or_path),
            "prompt_variant": variant.name,
            # only when set, so that predictions from before the caps existed still resume
            **({"task_image_max_pixels": dataset_caps} if dataset_caps != "none" else {}),
            **{name: getattr(args, name) for name in IDENTITY_SETTINGS},
        },
        "run": {name: getattr(args, name) for name in RUN_SETTINGS},
        "written_by": "tools.vllm_infer",
    }


def _first_difference(old: dict, new: dict) -> str | None:
    for key in [*new, *(k for k in old if k not in new)]:
        if old.get(key) != new.get(key):
            return f"{key}: {old.get(key)!r} there, {new.get(key)!r} now"
    return None


def start_output(save_path: str | os.PathLike, meta: dict, overwrite: bool = False) -> None:
    """Before predicting into save_path: start afresh (--overwrite), or resume only predictions of the same origin;
    then record the origin beside it."""
    save_path, side = Path(save_path), meta_path(save_path)
    if overwrite:
        for path in (save_path, side):
            if path.exists():
                path.unlink()
    elif save_path.is_file() and save_path.stat().st_size > 0:
        hint = "pass --overwrite to start afresh, or another --save_name"
        if not side.is_file():
            raise MireInputError(problem(save_path, None, None, f"holds predictions with no record of what made them "
                                                               f"({side.name} is missing); {hint}"))
        old = read_json(side)
        diff = _first_difference(old.get("origin", {}) if isinstance(old, dict) else {}, meta["origin"])
        if diff:
            raise MireInputError(problem(save_path, None, None, f"holds predictions of another model or settings "
                                                               f"({diff}); {hint}"))
    write_json_atomic(side, meta)


def merge_shard_origins(save_path: str | os.PathLike, shard_paths: list[Path]) -> None:
    """The merged file's record: the shards' common origin (they must share one)."""
    metas = [(path, read_json(meta_path(path))) for path in shard_paths if meta_path(path).is_file()]
    if not metas:
        return
    if len(metas) != len(shard_paths):
        missing = next(p for p in shard_paths if not meta_path(p).is_file())
        raise MireInputError(problem(missing, None, None, f"{meta_path(missing).name} is missing: cannot tell whether "
                                                          "this shard was made by the same model and settings"))
    first_path, first = metas[0]
    for path, meta in metas[1:]:
        diff = _first_difference(first.get("origin", {}), meta.get("origin", {}))
        if diff:
            raise MireInputError(problem(path, None, None, f"made by another model or settings than {first_path.name} "
                                                           f"({diff})"))
    write_json_atomic(meta_path(save_path), {**first, "run": {**first.get("run", {}), "merged_shards": len(metas)}})
