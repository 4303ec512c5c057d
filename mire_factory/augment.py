"""Augmented train copies (tools.convert --augment N): N extra rows per train record, never for validation or test.

Each copy draws, from its own RNG (seeded by --seed, the record's id and the copy's number, so a copy does not
depend on the other records or their order):
- for each image, a chain of transforms (image_copies.Op), in this order, each with its probability:
  - `scale` (0.5): both sides times one of 0.50, 0.55, ..., 0.90;
  - `gray` (0.2): grayscale;
  - `brightness` (0.5): a factor of 0.70, 0.75, ..., 1.30 (1.00 left out);
  - `jpeg` (0.5): re-encoded as JPEG at quality 30, 35, ..., 90;
  and one of the four, drawn evenly, when none came up: every augmented image differs from its source;
- for a dialogue, text masking: `--augment_mask_ratio` (0.15) of the letters, digits and CJK characters of the
  customer's turns (`用户: ` lines inside the dialogue) become MASK_TOKEN; tags (`<image>`, `<http>`), punctuation
  and spaces stay, as do the agent's turns, the instruction around the dialogue and the label.
A copy's id is `ID#augK` (K = 1..N; `source_id` gives ID back: tools.merge_cot gives a copy its source's reason);
its images are image_copies files, written once.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace

from .image_copies import Op
from .records import MireRecord
from .taxonomy import AGENT_PREFIX, DIALOGUE_END, DIALOGUE_START, USER_PREFIX

AUGMENT_KEY = "mire_augment"  # in the train split's registration: what was added
MASK_TOKEN = "*"
DEFAULT_MASK_RATIO = 0.15
SCALES = tuple(round(0.5 + 0.05 * i, 2) for i in range(9))
BRIGHTNESS = tuple(b for b in (round(0.7 + 0.05 * i, 2) for i in range(13)) if b != 1.0)
JPEG_QUALITIES = tuple(range(30, 91, 5))
_TRANSFORMS = ("scale", "gray", "brightness", "jpeg")
_PROBABILITY = {"scale": 0.5, "gray": 0.2, "brightness": 0.5, "jpeg": 0.5}
_TAG = re.compile(r"<[^<>\n]*>")


_COPY_ID = re.compile(r"#aug\d+$")


def copy_id(record_id: str, k: int) -> str:
    return f"{record_id}#aug{k}"


def source_id(row_id: str) -> str:
    """The id of the record an augmented copy was made from (a row id that is no copy's: itself)."""
    return _COPY_ID.sub("", row_id)


def _op(kind: str, rng: random.Random) -> Op:
    if kind == "scale":
        return Op("scale", rng.choice(SCALES))
    if kind == "brightness":
        return Op("brightness", rng.choice(BRIGHTNESS))
    if kind == "jpeg":
        return Op("jpeg", rng.choice(JPEG_QUALITIES))
    return Op("gray")


def draw_image_ops(rng: random.Random) -> tuple[Op, ...]:
    """One image's transforms, in the fixed order scale, gray, brightness, jpeg; never none."""
    chosen = [kind for kind in _TRANSFORMS if rng.random() < _PROBABILITY[kind]]
    if not chosen:
        chosen = [rng.choice(_TRANSFORMS)]
    return tuple(_op(kind, rng) for kind in chosen)


def mask_user_turns(instruction: str, ratio: float, rng: random.Random) -> str:
    """`ratio` of the maskable characters (letters, digits, CJK) of the customer's turns replaced by MASK_TOKEN (at
    least one when there are any and ratio > 0); everything else as it was."""
    lines = instruction.splitlines(keepends=True)
    inside = DIALOGUE_START not in instruction
    positions: list[tuple[int, int]] = []  # (line, character)
    for i, line in enumerate(lines):
        if DIALOGUE_START in line:
            inside = True
            continue
        if DIALOGUE_END in line:
            inside = False
        if not inside or not line.startswith(USER_PREFIX) or line.startswith(AGENT_PREFIX):
            continue
        tags = [range(m.start(), m.end()) for m in _TAG.finditer(line)]
        positions += [(i, j) for j in range(len(USER_PREFIX), len(line))
                      if line[j].isalnum() and not any(j in t for t in tags)]
    if not positions or ratio <= 0:
        return instruction
    chosen = sorted(rng.sample(positions, max(1, round(ratio * len(positions)))))
    out = [list(line) for line in lines]
    for i, j in chosen:
        out[i][j] = MASK_TOKEN
    return "".join("".join(chars) for chars in out)


@dataclass
class AugmentedRecord:
    record: MireRecord  # the copy: id ID#augK, a dialogue's customer turns masked
    source_id: str
    image_ops: list[tuple[Op, ...]]  # per image, its transforms


def augment_records(records: list[MireRecord], copies: int, seed: int,
                    mask_ratio: float = DEFAULT_MASK_RATIO) -> list[AugmentedRecord]:
    """`copies` augmented copies of every record: all first copies in the records' order, then the second ones..."""
    out = []
    for k in range(1, copies + 1):
        for r in records:
            rng = random.Random(f"mire-augment:{seed}:{r.id}:{k}")
            ops = [draw_image_ops(rng) for _ in r.images]
            instruction = mask_user_turns(r.instruction, mask_ratio, rng) if r.task == "dialogue" else r.instruction
            out.append(AugmentedRecord(replace(r, id=copy_id(r.id, k), instruction=instruction), r.id, ops))
    return out


def registration(copies: int, rows: int, seed: int, mask_ratio: float) -> dict:
    return {"copies": copies, "rows": rows, "seed": seed, "mask_ratio": mask_ratio, "mask_token": MASK_TOKEN,
            "transforms": {kind: _PROBABILITY[kind] for kind in _TRANSFORMS}}
