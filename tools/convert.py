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
from dataclasses import dataclass, field

from mire_factory.augment import DEFAULT_MASK_RATIO, MASK_TOKEN
from mire_factory.convert import FORMATS, TASK_CHOICES, convert
from mire_factory.hparams import config_field, parse_args
from mire_factory.image_copies import MIN_CAP
from mire_factory.io import run_cli
from mire_factory.prompt_variants import DEFAULT_PROMPT_VARIANT, PROMPT_VARIANTS
from mire_factory.records import KINDS
from mire_factory.screenshot_text import DEFAULT_INFO_MAX_TOKENS
from tools.validate import ImageCheckArguments


@dataclass(kw_only=True)
class ConvertArguments(ImageCheckArguments):
    input_file: str = field(metadata={"help": "MIRE json (train: every `output` set; test: none)"})
    image_dir: str = field(metadata={"help": "folder of the images"})
    output_dir: str = field(metadata={"help": "where the converted files and dataset_info.json go"})
    val_size: float = field(default=0.1, metadata={"help": "validation share of a train file, in [0, 1)"})
    seed: int = field(default=42, metadata={"help": "seed of the validation split and of --augment"})
    task: str = field(default="all", metadata={"help": "keep one task (names mire_TASK_*)",
                                               "choices": list(TASK_CHOICES)})
    format: str = field(default="sharegpt", metadata={"help": "LLaMA-Factory ShareGPT, or ms-swift JSONL",
                                                      "choices": list(FORMATS)})
    kind: str = field(default="auto", metadata={
        "help": "train: every record needs `output`; test: labels optional; auto: decided by the file",
        "choices": list(KINDS)})
    prompt_variant: str = field(default=DEFAULT_PROMPT_VARIANT, metadata={
        "help": "how every split's turns are written: "
                + "; ".join(f"{v.name}: {v.description}" for v in PROMPT_VARIANTS.values()),
        "choices": list(PROMPT_VARIANTS)})
    info_file: str | None = field(default=None, metadata={
        "help": "an info file of tools.extract_info: the text of every image, for a screenshot_text variant"})
    info_max_tokens: int = field(default=DEFAULT_INFO_MAX_TOKENS, metadata={
        "help": "a record's image text is cut (whole lines, the longest image's first) to this many Qwen2 tokens"})
    corrections_file: str | None = field(default=None, metadata={
        "help": "a corrections file (tools.analyze, tools.kfold, the review page): its accepted label changes are "
                "applied by id before the split and recorded in dataset_info.json"})
    augment: int = field(default=0, metadata={
        "help": "augmented copies of every train-split record (0: none; a train file only): transformed images "
                "(scale, grayscale, brightness, JPEG), masked customer turns"})
    augment_mask_ratio: float = field(default=DEFAULT_MASK_RATIO, metadata={
        "help": f"share of the customer turns' characters an augmented dialogue masks with {MASK_TOKEN!r}, in [0, 1)"})
    scene_image_max_pixels: int | None = field(default=None, metadata={
        "help": "the image task's (scene) images over this many pixels are shrunk at conversion, in every split, as "
                f"LLaMA-Factory's image_max_pixels would (at least {MIN_CAP}; default: no cap of its own)"})
    dialogue_image_max_pixels: int | None = field(default=None, metadata={
        "help": "the same for the dialogues' screenshots (e.g. 175616: a 1170x2532 screenshot becomes 284x616, "
                "220 image tokens)"})
    config: str | None = config_field()

    def __post_init__(self):
        if not 0 <= self.val_size < 1:
            raise ValueError(f"--val_size must be in [0, 1), got {self.val_size}")
        if self.augment < 0:
            raise ValueError(f"--augment must be a number of copies >= 0, got {self.augment}")
        if not 0 <= self.augment_mask_ratio < 1:
            raise ValueError(f"--augment_mask_ratio must be in [0, 1), got {self.augment_mask_ratio}")
        for name in ("scene_image_max_pixels", "dialogue_image_max_pixels"):
            value = getattr(self, name)
            if value is not None and value < MIN_CAP:
                raise ValueError(f"--{name} must be at least {MIN_CAP} pixels (56x56, Qwen2-VL's smallest image), "
                                 f"got {value}")


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
