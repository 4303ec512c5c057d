"""Splitting an instruction at its <image> placeholders into ordered text and image parts."""

from __future__ import annotations

import os
from pathlib import Path

from .records import IMAGE_PLACEHOLDER, MireRecord


def split_instruction(instruction: str) -> list[str]:
    """The text segments around the placeholders: len(segments) == number of placeholders + 1."""
    return instruction.split(IMAGE_PLACEHOLDER)


def to_content_parts(record: MireRecord, image_dir: str | os.PathLike | None = None) -> list[dict]:
    """OpenAI/qwen-vl-utils style content: [{"type": "text", "text": ...}, {"type": "image", "image": path}, ...].

    Empty text segments are left out; joining the texts with <image> at each image part restores the instruction.
    """
    instruction, images = record.instruction, record.images
    segments = split_instruction(instruction)
    if len(segments) - 1 != len(images):
        raise ValueError(f"{len(segments) - 1} {IMAGE_PLACEHOLDER} placeholders but {len(images)} images")
    parts: list[dict] = []
    for k, text in enumerate(segments):
        if text:
            parts.append({"type": "text", "text": text})
        if k < len(images):
            path = str(Path(image_dir) / images[k]) if image_dir is not None else images[k]
            parts.append({"type": "image", "image": path})
    return parts


def join_content_parts(parts: list[dict]) -> tuple[str, list[str]]:
    """Inverse of to_content_parts: the instruction and the image paths in order."""
    text, images = [], []
    for part in parts:
        if part["type"] == "text":
            text.append(part["text"])
        elif part["type"] == "image":
            text.append(IMAGE_PLACEHOLDER)
            images.append(part["image"])
        else:
            raise ValueError(f"unknown content part type {part['type']!r}")
    return "".join(text), images
