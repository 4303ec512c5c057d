"""tools.convert's and tools.validate's flags, as dataclasses (LLaMA-Factory's hparams style): the one list of them,
which tools.kfold (--convert_flags) and the quality harness (--variant) check their arguments against."""

from __future__ import annotations

from dataclasses import dataclass, field

from .augment import DEFAULT_MASK_RATIO, MASK_TOKEN
from .convert import FORMATS, TASK_CHOICES
from .hparams import config_field
from .image_copies import MIN_CAP
from .prompt_variants import DEFAULT_PROMPT_VARIANT, PROMPT_VARIANTS
from .records import KINDS
from .screenshot_text import DEFAULT_INFO_MAX_TOKENS


@dataclass(kw_only=True)
class ImageCheckArguments:
    """How images are checked (tools.validate, tools.convert)."""

    quick: bool = field(default=False, metadata={"help": "read image headers only, do not decode the images"})
    verify_images: bool = field(default=False, metadata={
        "help": "no-op, kept for old scripts: images are decoded by default (see --quick)"})


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

