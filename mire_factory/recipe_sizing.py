"""Sequence lengths of MIRE records as LLaMA-Factory tokenizes them for training: the numbers behind the recipes'
`image_max_pixels` and `cutoff_len`.

Each record is rendered exactly as training renders it: LLaMA-Factory's `qwen2_vl` template and mm_plugin (which
shrinks every image to at most `image_max_pixels`, then Qwen2-VL's smart_resize rounds it to 28-pixel multiples:
one token per 28x28 patch), the real Qwen2 tokenizer, the label as the assistant turn.

    python -m mire_factory.recipe_sizing --input_file ../shared/mire_sample/train_sample.json \
        --image_dir ../shared/mire_sample/images --image_max_pixels 401408,589824,1003520
        [--prompt_variant screenshot_text --info_file info.jsonl [--info_max_tokens 256]]
        [--scene_image_max_pixels P] [--dialogue_image_max_pixels P]

With --prompt_variant the user turn is the variant's (a screenshot-text variant adds each record's image text, at
most --info_max_tokens tokens of it), as tools.convert writes it. With a per-task cap (tools.convert's flags of the
same names) each budget is measured twice: without the caps, and with each task's images first shrunk to its cap as
tools.convert writes them (image_copies), then to the budget as LLaMA-Factory does.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path

from .image_copies import MIN_CAP
from .io import MireInputError, run_cli
from .prompt_variants import PROMPT_VARIANTS
from .records import MireRecord, load_records
from .screenshot_text import DEFAULT_INFO_MAX_TOKENS

# Qwen2-VL-7B-Instruct's preprocessor_config.json; LLaMA-Factory's own cap (image_max_pixels) applies first.
QWEN2_VL_MIN_PIXELS = 56 * 56
QWEN2_VL_MAX_PIXELS = 28 * 28 * 16384
DEFAULT_BUDGETS = (262144, 401408, 589824, 1003520)


@dataclass
class RecordLength:
    id: str
    task: str
    n_images: int
    image_tokens: int  # <|image_pad|> tokens after the mm_plugin expanded them
    total_tokens: int  # prompt + answer, as the supervised dataset processor sees them before cutoff


def build_renderer(image_max_pixels: int, image_min_pixels: int = 32 * 32):
    """(template, tokenizer, processor) set up as LLaMA-Factory's loader sets them for training."""
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments

    from .tiny_model import build_processor, load_qwen2_tokenizer

    tokenizer = load_qwen2_tokenizer()
    processor = build_processor(tokenizer)
    processor.image_processor.min_pixels = QWEN2_VL_MIN_PIXELS
    processor.image_processor.max_pixels = QWEN2_VL_MAX_PIXELS
    processor.image_processor.size = {"shortest_edge": QWEN2_VL_MIN_PIXELS, "longest_edge": QWEN2_VL_MAX_PIXELS}
    # what llamafactory.model.patcher.patch_processor sets from ModelArguments
    processor.image_max_pixels = image_max_pixels
    processor.image_min_pixels = image_min_pixels
    template = get_template_and_fix_tokenizer(tokenizer, DataArguments(template="qwen2_vl"))
    return template, tokenizer, processor


def record_length(record: MireRecord, image_dir: str | os.PathLike, renderer, user: str | None = None,
                  answer: str | None = None, max_pixels: int | None = None) -> RecordLength:
    """The record's length with its turns as given (default: the instruction and the bare label); `max_pixels`: its
    images shrunk first to that cap, as tools.convert's per-task caps write them."""
    template, tokenizer, processor = renderer
    images = [str(Path(image_dir) / name) for name in record.images]
    if max_pixels is not None:
        images = [_capped(path, max_pixels) for path in images]
    messages = [
        {"role": "user", "content": record.instruction if user is None else user},
        {"role": "assistant", "content": (record.output or "") if answer is None else answer},
    ]
    messages = template.mm_plugin.process_messages(messages, images, [], [], processor)
    prompt_ids, answer_ids = template.encode_oneturn(tokenizer, messages)
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    return RecordLength(
        id=record.id,
        task=record.task,
        n_images=len(images),
        image_tokens=sum(1 for t in prompt_ids if t == image_pad),
        total_tokens=len(prompt_ids) + len(answer_ids),
    )


def _capped(path: str, max_pixels: int):
    """The image as tools.convert's cap writes it (a PIL image; the source path when it fits)."""
    from PIL import Image

    from .image_copies import apply_ops, cap_ops

    with Image.open(path) as image:
        ops = cap_ops(image.size, max_pixels)
        if not ops:
            return path
        image.load()
        return apply_ops(image, ops)


def measure(records: list[MireRecord], image_dir: str | os.PathLike, image_max_pixels: int,
            prompt_variant: str | None = None, info_file: str | os.PathLike | None = None,
            info_max_tokens: int | None = None,
            task_max_pixels: dict[str, int | None] | None = None) -> list[RecordLength]:
    """Each record's length as training renders it; with a prompt variant, its turns as tools.convert writes them
    (a screenshot-text variant's image text from `info_file`, within `info_max_tokens`; a CoT answer without its
    reason: merge_cot's reasons add at most 100 tokens more); with `task_max_pixels` {task: P}, each task's images
    shrunk to its cap first, as tools.convert's --scene_image_max_pixels / --dialogue_image_max_pixels write them."""
    renderer = build_renderer(image_max_pixels)
    caps = task_max_pixels or {}
    if prompt_variant is None:
        return [record_length(r, image_dir, renderer, max_pixels=caps.get(r.task)) for r in records]
    from .convert import user_content
    from .prompt_variants import get_prompt_variant
    from .screenshot_text import ScreenshotText

    variant = get_prompt_variant(prompt_variant)
    if variant.context and info_file is None:
        raise MireInputError(f"--prompt_variant {variant.name}: needs --info_file")
    contexts = (ScreenshotText(info_file, info_max_tokens or DEFAULT_INFO_MAX_TOKENS).contexts(records, image_dir,
                                                                                                "records")
                if variant.context else [None] * len(records))
    return [record_length(r, image_dir, renderer, variant.user_turn(user_content(r), r.task, context),
                          variant.answer(r.output) if r.output else "", caps.get(r.task))
            for r, context in zip(records, contexts, strict=True)]


def smallest_cutoff(lengths: list[RecordLength], multiple: int = 1024) -> int:
    """The smallest multiple of `multiple` that holds every record whole."""
    return multiple * math.ceil(max(x.total_tokens for x in lengths) / multiple)


def summary_rows(lengths: list[RecordLength]) -> dict[str, dict[str, int]]:
    rows = {}
    for task in ("image", "dialogue"):
        sel = [x for x in lengths if x.task == task]
        if not sel:
            continue
        with_images = [x.image_tokens / x.n_images for x in sel if x.n_images]
        rows[task] = {
            "records": len(sel),
            "max_images": max(x.n_images for x in sel),
            "tokens_per_image_max": round(max(with_images)) if with_images else 0,
            "total_min": min(x.total_tokens for x in sel),
            "total_median": sorted(x.total_tokens for x in sel)[len(sel) // 2],
            "total_max": max(x.total_tokens for x in sel),
            "text_max": max(x.total_tokens - x.image_tokens for x in sel),
        }
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_file", required=True)
    parser.add_argument("--image_dir", required=True)
    parser.add_argument("--image_max_pixels", default=",".join(map(str, DEFAULT_BUDGETS)),
                        help="comma-separated pixel budgets to compare")
    parser.add_argument("--prompt_variant", choices=list(PROMPT_VARIANTS),
                        help="measure the turns as tools.convert writes them with this variant (default: the "
                             "instruction and the label)")
    parser.add_argument("--info_file", help="a screenshot_text variant's image text (tools.extract_info)")
    parser.add_argument("--info_max_tokens", type=int, default=DEFAULT_INFO_MAX_TOKENS)
    parser.add_argument("--scene_image_max_pixels", type=int,
                        help="also measure with the image task's images shrunk to this cap (tools.convert's flag)")
    parser.add_argument("--dialogue_image_max_pixels", type=int,
                        help="also measure with the dialogues' images shrunk to this cap (tools.convert's flag)")
    args = parser.parse_args(argv)
    caps = {t: cap for t, cap in (("image", args.scene_image_max_pixels),
                                   ("dialogue", args.dialogue_image_max_pixels)) if cap is not None}
    for name, cap in (("scene", args.scene_image_max_pixels), ("dialogue", args.dialogue_image_max_pixels)):
        if cap is not None and cap < MIN_CAP:
            raise MireInputError(f"--{name}_image_max_pixels: expected at least {MIN_CAP} pixels, got {cap}")
    records = load_records(args.input_file, args.image_dir, kind="train")
    print("image_max_pixels | task cap | task | records | max images | tokens/image (max) | total min/median/max | "
          "text-only max | smallest cutoff_len (x1024) holding all")
    for budget in (int(b) for b in args.image_max_pixels.split(",")):
        for task_caps in ({}, caps) if caps else ({},):
            lengths = measure(records, args.image_dir, budget, args.prompt_variant, args.info_file,
                              args.info_max_tokens, task_caps)
            cutoff = smallest_cutoff(lengths)
            for task, row in summary_rows(lengths).items():
                print(f"{budget} | {task_caps.get(task, '-')} | {task} | {row['records']} | {row['max_images']} | "
                      f"{row['tokens_per_image_max']} | {row['total_min']}/{row['total_median']}/{row['total_max']} "
                      f"| {row['text_max']} | {cutoff}")
    return 0


if __name__ == "__main__":
    run_cli(main)
