"""Splitting a dataset across GPUs or nodes, and merging the shard files back into one predictions file."""

from __future__ import annotations

import os
from pathlib import Path

from ..io import MireInputError, problem, write_jsonl_atomic
from .output import PredictionsLog


def shard_range(n: int, num_shards: int, shard_index: int) -> range:
    """Contiguous, near-equal blocks: shard i gets [i*n//N, (i+1)*n//N)."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise MireInputError(f"--shard_index must be in [0, {num_shards}) and --num_shards >= 1, "
                             f"got {shard_index} of {num_shards}")
    return range(shard_index * n // num_shards, (shard_index + 1) * n // num_shards)


def shard_path(save_path: str | os.PathLike, shard_index: int, num_shards: int) -> Path:
    save_path = Path(save_path)
    return save_path.with_name(f"{save_path.stem}.shard-{shard_index}-of-{num_shards}{save_path.suffix}")


def merge_shards(save_path: str | os.PathLike, num_shards: int, ordered_ids: list[str]) -> int:
    """Writes save_path from its shard files, in dataset order; every id exactly once, or MireInputError."""
    rows: dict[str, dict] = {}
    problems = []
    for i in range(num_shards):
        path = shard_path(save_path, i, num_shards)
        if not path.is_file():
            problems.append(problem(path, None, None, "shard file not found"))
            continue
        for rid, row in PredictionsLog(path).done().items():
            if rid in rows:
                problems.append(problem(path, rid, "id", "also in another shard"))
            rows[rid] = row
    missing = [rid for rid in ordered_ids if rid not in rows]
    if missing:
        problems.append(problem(save_path, None, None, f"{len(missing)} records have no prediction in any shard "
                                                       f"(first: {missing[0]!r}); finish the shards first"))
    extra = sorted(set(rows) - set(ordered_ids))
    if extra:
        problems.append(problem(save_path, extra[0], "id", f"{len(extra)} predicted ids are not in the dataset"))
    if problems:
        raise MireInputError(problems)
    with PredictionsLog(save_path).lock():  # checked first: a refusal leaves not even a lock file
        write_jsonl_atomic(save_path, [rows[rid] for rid in ordered_ids])
    return len(ordered_ids)
