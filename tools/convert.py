"""MIRE train/test json to LLaMA-Factory ShareGPT files registered in dataset_info.json (or ms-swift JSONL).

python -m tools.convert --input_file train.json --image_dir images --output_dir data [--val_size 0.1] [--seed 42]
    [--task all|image|dialogue] [--format sharegpt|swift] [--prompt_variant plain|cot|cot_label_first]
    [--kind auto|train|test] [--quick] [--prompt_variant screenshot_text --info_file info.jsonl [--info_max_tokens 256]]

A train file (every record labelled) gives mire_train (+ mire_val); a test file (no record labelled: `output` absent
or "") gives mire_test. Convert the train and the test file with the same --prompt_variant: it writes every split's
turns and is recorded in dataset_info.json, where tools.merge_cot and tools.vllm_infer read it back.
A screenshot_text variant puts the text of each record's images (--info_file, from tools.extract_info) on a new line
after the instruction, at most --info_max_tokens tokens per record; records without images get none.
Image paths are written relative to --output_dir: set LLaMA-Factory's `dataset_dir` (and so `media_dir`) to it.
"""

from __future__ import annotations

import argparse
import sys

from mire_factory.convert import FORMATS, TASK_CHOICES, convert
from mire_factory.io import run_cli
from mire_factory.prompt_variants import DEFAULT_PROMPT_VARIANT, PROMPT_VARIANTS
from mire_factory.records import KINDS
from mire_factory.screenshot_text import DEFAULT_INFO_MAX_TOKENS
from tools.validate import add_image_check_flags


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_file", required=True, help="MIRE json (train: every `output` set; test: none)")
    parser.add_argument("--image_dir", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--val_size", type=float, default=0.1, help="validation share of a train file, in [0, 1)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--task", choices=TASK_CHOICES, default="all", help="keep one task (names mire_TASK_*)")
    parser.add_argument("--format", choices=FORMATS, default="sharegpt")
    parser.add_argument("--kind", choices=KINDS, default="auto",
                        help="train: every record needs `output`; test: labels optional; auto: decided by the file")
    parser.add_argument("--prompt_variant", choices=list(PROMPT_VARIANTS), default=DEFAULT_PROMPT_VARIANT,
                        help="how every split's turns are written: "
                             + "; ".join(f"{v.name}: {v.description}" for v in PROMPT_VARIANTS.values()))
    parser.add_argument("--info_file", help="an info file of tools.extract_info: the text of every image, for a "
                        "screenshot_text variant")
    parser.add_argument("--info_max_tokens", type=int, default=DEFAULT_INFO_MAX_TOKENS,
                        help="a record's image text is cut (whole lines, the longest image's first) to this many "
                             "Qwen2 tokens")
    add_image_check_flags(parser)
    args = parser.parse_args(argv)
    if not 0 <= args.val_size < 1:
        parser.error(f"--val_size must be in [0, 1), got {args.val_size}")
    result = convert(
        args.input_file, args.image_dir, args.output_dir, val_size=args.val_size, seed=args.seed, task=args.task,
        fmt=args.format, kind=args.kind, decode_images=not args.quick, prompt_variant=args.prompt_variant,
        info_file=args.info_file, info_max_tokens=args.info_max_tokens,
    )
    print(result.summary)
    for name in result.removed:
        print(f"removed {name} of an earlier run (this run does not write it) and its registration")
    for line in result.warnings:
        print(f"warning: {line}", file=sys.stderr)
    if result.dataset_info is not None:
        names = ", ".join(result.splits)
        print(f"registered {names} (prompt variant {args.prompt_variant}) in {result.dataset_info} "
              f"(LLaMA-Factory: dataset_dir: {args.output_dir})")
    return 0


if __name__ == "__main__":
    run_cli(main)
