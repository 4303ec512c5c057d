"""Fitting each prompt into the token budget before anything is rendered.

Token counts come from arithmetic, not from rendering: text pieces are batch-tokenized with the real tokenizer, and
each image costs (h/28)*(w/28) pad tokens + <|vision_start|><|vision_end|>, with (h, w) from its file header put
through LLaMA-Factory's pre-resize and the image processor's smart_resize. Text is split only at points where the
Qwen2 pre-tokenizer splits anyway (after a newline, at special tokens), so the counts add up exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..records import IMAGE_PLACEHOLDER, image_size
from ..taxonomy import AGENT_PREFIX, DIALOGUE_END, DIALOGUE_START, USER_PREFIX

VISION_WRAPPER_TOKENS = 2  # <|vision_start|> and <|vision_end|>


@dataclass(frozen=True)
class ImageTokenizer:
    """Image size -> number of image-pad tokens, as LLaMA-Factory's Qwen2VLPlugin + the image processor compute it."""

    image_max_pixels: int
    image_min_pixels: int
    processor_min_pixels: int
    processor_max_pixels: int
    patch_size: int = 14
    merge_size: int = 2

    @classmethod
    def from_processor(cls, processor) -> ImageTokenizer:
        ip = processor.image_processor
        size = ip.size
        get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
        return cls(
            image_max_pixels=processor.image_max_pixels,
            image_min_pixels=processor.image_min_pixels,
            processor_min_pixels=getattr(ip, "min_pixels", None) or get("shortest_edge"),
            processor_max_pixels=getattr(ip, "max_pixels", None) or get("longest_edge"),
            patch_size=ip.patch_size,
            merge_size=ip.merge_size,
        )

    def regularized_size(self, width: int, height: int) -> tuple[int, int]:
        # BasePlugin._preprocess_image then Qwen2VLPlugin._preprocess_image.
        if width * height > self.image_max_pixels:
            f = math.sqrt(self.image_max_pixels / (width * height))
            width, height = int(width * f), int(height * f)
        if width * height < self.image_min_pixels:
            f = math.sqrt(self.image_min_pixels / (width * height))
            width, height = int(width * f), int(height * f)
        if min(width, height) < 28:
            width, height = max(width, 28), max(height, 28)
        if width / height > 200:
            width, height = height * 180, height
        if height / width > 200:
            width, height = width, width * 180
        return width, height

    def count(self, width: int, height: int) -> int:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        width, height = self.regularized_size(width, height)
        factor = self.patch_size * self.merge_size
        h, w = smart_resize(height, width, factor=factor, min_pixels=self.processor_min_pixels,
                            max_pixels=self.processor_max_pixels)
        return (h // factor) * (w // factor)


@dataclass
class Plan:
    content: str
    images: list[str]
    image_tokens: list[int]  # pad tokens per kept image
    n_tokens: int  # the whole prompt, template included
    dropped_turns: list[int] = field(default_factory=list)  # indices into the dialogue's turns
    dropped_images: list[int] = field(default_factory=list)  # indices into the record's images
    over_budget: bool = False  # still over after dropping everything allowed

    def info(self) -> dict:
        return {"prompt_tokens": self.n_tokens, "dropped_turns": self.dropped_turns,
                "dropped_images": self.dropped_images, "over_budget": self.over_budget}


def split_dialogue(content: str) -> tuple[str, list[str], str] | None:
    """(header, turns, footer) of a MIRE dialogue instruction; None when the content is not one.

    A turn starts at a line beginning with `用户:` or `客服:`; other lines continue the turn before them.
    """
    start, end = content.find(DIALOGUE_START), content.find(DIALOGUE_END)
    if start < 0 or end < start:
        return None
    body_start = content.find("\n", start)
    if body_start < 0 or body_start >= end:
        return None
    header, body, footer = content[: body_start + 1], content[body_start + 1 : end], content[end:]
    turns: list[str] = []
    for line in body.splitlines(keepends=True):
        if line.startswith((USER_PREFIX.strip(), AGENT_PREFIX.strip())) or not turns:
            turns.append(line)
        else:
            turns[-1] += line
    return header, turns, footer


def _last_user_turn(turns: list[str]) -> int:
    for k in range(len(turns) - 1, -1, -1):
        if turns[k].startswith(USER_PREFIX.strip()):
            return k
    return len(turns)  # no user turn: protect nothing of the body beyond what the budget allows


class Planner:
    """Plans many records at once: one batched tokenizer call for all their text."""

    def __init__(self, tokenizer, image_tokenizer: ImageTokenizer, overhead: int, cutoff_len: int,
                 max_images: int | None = None):
        self.tokenizer = tokenizer
        self.image_tokenizer = image_tokenizer
        self.overhead = overhead  # template tokens around an empty user turn
        self.cutoff_len = cutoff_len
        self.max_images = max_images

    def _count_texts(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        enc = self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        return [len(ids) for ids in enc]

    def plan_many(self, records: list, sizes: list[list[tuple[int, int]]] | None = None) -> list[Plan]:
        """records: MireRecords (their .instruction and .images); sizes: (w, h) per image, read from headers when None."""
        if sizes is None:
            sizes = [[image_size(p) for p in r.images] for r in records]
        units_per_record: list[list[str]] = []
        pieces: list[str] = []
        for r in records:
            parts = split_dialogue(r.instruction)
            units = [parts[0], *parts[1], parts[2]] if parts else [r.instruction]
            units_per_record.append(units)
            for unit in units:
                pieces.extend(unit.split(IMAGE_PLACEHOLDER))
        counts = iter(self._count_texts(pieces))
        plans = []
        for r, units, size_list in zip(records, units_per_record, sizes, strict=True):
            image_costs = [self.image_tokenizer.count(w, h) for w, h in size_list]
            text_costs = [sum(next(counts) for _ in unit.split(IMAGE_PLACEHOLDER)) for unit in units]
            plans.append(self._plan_one(r, units, text_costs, image_costs, dialogue=len(units) > 1))
        return plans

    def _plan_one(self, record, units, text_costs, image_costs, dialogue: bool) -> Plan:
        # Image k lives in unit image_unit[k]; units are header, turns..., footer for dialogues.
        image_unit = [u for u, unit in enumerate(units) for _ in range(unit.count(IMAGE_PLACEHOLDER))]
        kept_unit = [True] * len(units)
        kept_image = [True] * len(image_costs)
        units = list(units)

        def total() -> int:
            text = sum(c for c, keep in zip(text_costs, kept_unit, strict=True) if keep)
            img = sum(c + VISION_WRAPPER_TOKENS for c, keep in zip(image_costs, kept_image, strict=True) if keep)
            return self.overhead + text + img

        def drop_unit(u: int) -> None:
            kept_unit[u] = False
            for k, uu in enumerate(image_unit):
                if uu == u:
                    kept_image[k] = False

        protected_from = (1 + _last_user_turn(units[1:-1])) if dialogue else len(units)
        droppable = list(range(1, protected_from)) if dialogue else []

        if self.max_images is not None:
            for k in range(len(image_costs)):  # earliest first
                if sum(kept_image) <= self.max_images:
                    break
                if not kept_image[k]:
                    continue
                u = image_unit[k]
                if u in droppable and _is_image_only_turn(units[u]):
                    drop_unit(u)
                else:  # keep the unit's text, lose the image
                    present_before = sum(1 for j in range(k) if image_unit[j] == u and kept_image[j])
                    units[u] = _remove_nth_placeholder(units[u], present_before)
                    kept_image[k] = False
                    text_costs[u] = sum(self._count_texts(units[u].split(IMAGE_PLACEHOLDER)))

        for u in droppable:
            if total() <= self.cutoff_len:
                break
            if kept_unit[u]:
                drop_unit(u)

        content = "".join(unit for unit, keep in zip(units, kept_unit, strict=True) if keep)
        return Plan(
            content=content,
            images=[p for p, keep in zip(record.images, kept_image, strict=True) if keep],
            image_tokens=[c for c, keep in zip(image_costs, kept_image, strict=True) if keep],
            n_tokens=total(),
            dropped_turns=[u - 1 for u in droppable if not kept_unit[u]],
            dropped_images=[k for k, keep in enumerate(kept_image) if not keep],
            over_budget=total() > self.cutoff_len,
        )


def _is_image_only_turn(turn: str) -> bool:
    rest = turn.replace(IMAGE_PLACEHOLDER, "").strip()
    return rest in (USER_PREFIX.strip(), AGENT_PREFIX.strip())


def _remove_nth_placeholder(text: str, n: int) -> str:
    parts = text.split(IMAGE_PLACEHOLDER)
    return IMAGE_PLACEHOLDER.join(parts[:n] + [parts[n] + parts[n + 1]] + parts[n + 2 :])
