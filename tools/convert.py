"""MIRE train/test json to LLaMA-Factory ShareGPT files registered in dataset_info.json (or ms-swift JSONL).

python -m tools.convert --input_file train.json --image_dir images --output_dir data [--val_size 0.1] [--seed 42]
    [--task all|image|dialogue] [--format sharegpt|swift] [--prompt_variant plain|cot|cot_label_first]
    [--kind auto|train|test] [--quick] [--prompt_variant screenshot_text --info_file info.jsonl [--info_max_tokens 256]]
    [--corrections_file corrections.jsonl] [--augment N [--augment_mask_ratio 0.15]]
    [--scene_image_max_pixels P] [--dialogue_image_max_pixels P]

A train file (every record labelled) gives mire_train (+ mire_val); a test file (no record labelled: `output` absent
or "") gives mire_test. Convert the train and the test file with the same --prompt_variant: it writes every split's
turns and is recorded in dataset_info.json, where tools.merge_cot and tools.vllm_infer read it back.
A screenshot_text variant puts the text of each record's images (--info_file, from tools.extract_info) on a new line
after the instruction, at most --info_max_tokens tokens per record; records without images get none.
--corrections_file applies the accepted lines of a corrections file (reviewed relabels, by id; see
mire_factory/corrections.py) before the split; dataset_info.json lists, per split, the corrections applied to it.
--augment N adds N augmented copies of every train-split record (a train file only; never val or test): images
transformed (scale, grayscale, brightness, JPEG re-encoding; mire_factory/augment.py), a dialogue's customer turns
masked; seeded by --seed. Their images are written once into --output_dir/derived_images (mire_factory/image_copies.py).
--scene_image_max_pixels / --dialogue_image_max_pixels shrink the image task's / the dialogues' images over that many
pixels, as LLaMA-Factory's image_max_pixels would, into --output_dir/derived_images, in every split (train, val and
test alike): training and inference read the same files. The recipe's image_max_pixels still applies on top, so a cap
above it changes nothing. Convert the train and the test file with the same caps.
Image paths are written relative to --output_dir: set LLaMA-Factory's `dataset_dir` (and so `media_dir`) to it.
"""

from __future__ import annotations

import sys

from mire_factory.convert import convert
from mire_factory.convert_args import ConvertArguments
from mire_factory.hparams import parse_args
from mire_factory.io import run_cli


def main(argv: list[str] | None = None) -> int:
    args = parse_args(ConvertArguments, argv, __doc__)
    result = convert(
        args.input_file, args.image_dir, args.output_dir, val_size=args.val_size, seed=args.seed, task=args.task,
        fmt=args.format, kind=args.kind, decode_images=not args.quick, prompt_variant=args.prompt_variant,
        info_file=args.info_file, info_max_tokens=args.info_max_tokens, corrections_file=args.corrections_file,
        augment=args.augment, augment_mask_ratio=args.augment_mask_ratio,
        task_max_pixels={"image": args.scene_image_max_pixels, "dialogue": args.dialogue_image_max_pixels},
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
