"""MIRE train/test json to LLaMA-Factory ShareGPT files registered in dataset_info.json (or ms-swift JSONL).

python -m tools.convert --input_file train.json --image_dir images --output_dir data [--val_size 0.1] [--seed 42]
    [--task all|image|dialogue] [--format sharegpt|swift]

Image paths are written relative to --output_dir: set LLaMA-Factory's `dataset_dir` (and so `media_dir`) to it.
"""

from __future__ import annotations

import argparse
import sys

from mire_factory.convert import FORMATS, TASK_CHOICES, convert
from mire_factory.io import run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_file", required=True, help="MIRE json (train: with `output`; test: without)")
    parser.add_argument("--image_dir", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--val_size", type=float, default=0.1, help="validation share of a train file, in [0, 1)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--task", choices=TASK_CHOICES, default="all", help="keep one task (names mire_TASK_*)")
    parser.add_argument("--format", choices=FORMATS, default="sharegpt")
    parser.add_argument("--kind", choices=["auto", "train", "test"], default="auto")
    parser.add_argument("--verify_images", action="store_true", help="decode every image fully, not only its header")
    args = parser.parse_args(argv)
    if not 0 <= args.val_size < 1:
        parser.error(f"--val_size must be in [0, 1), got {args.val_size}")
    result = convert(
        args.input_file, args.image_dir, args.output_dir, val_size=args.val_size, seed=args.seed, task=args.task,
        fmt=args.format, kind=args.kind, verify_images=args.verify_images,
    )
    print(result.summary)
    for name in result.removed:
        print(f"removed {name} of an earlier run (this run does not write it) and its registration")
    for line in result.warnings:
        print(f"warning: {line}", file=sys.stderr)
    if result.dataset_info is not None:
        names = ", ".join(result.splits)
        print(f"registered {names} in {result.dataset_info} (LLaMA-Factory: dataset_dir: {args.output_dir})")
    return 0


if __name__ == "__main__":
    run_cli(main)
