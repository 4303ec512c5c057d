"""Packed training batches computed without their trailing padding.

Why: LLaMA-Factory's neat_packing pads every pack to `cutoff_len` (data/processor/supervised.py: "avoid flash_attn
drops attn mask"; the model is handed `cutoff_len` positions), so a pack holding 9,000 real tokens still runs 10,240
positions through every layer. On the real training data the packs are 91.6% real tokens on average
(BENCHMARKS.md, issue 20, pack_stats); the 15 packs of a 7B run on the H200 ran 5.3% fewer positions with this, and
logged the same losses.
Why it is exact: padding comes after every real token of its row; under neat_packing's block-diagonal mask a padding
position sees nothing and no real token sees it, and its labels are ignored. Cutting the trailing positions every row
pads leaves every real token's keys, outputs and loss terms as they were (the loss is a mean over label tokens, or a
sum over num_items_in_batch, neither of which counts padding).

`enable(model)` registers a forward pre-hook on the model: a training call with a 4D mask (a packed batch) has its
token-aligned arguments (input_ids, labels, position_ids, the mask's two token axes, ...) cut to the last real token,
rounded up to a multiple of 8 as the collator rounds. Anything else (2D masks: the collator already pads those to the
longest row; evaluation; a tensor argument it does not know that runs along the tokens) goes through as it is.
`mire_factory.train` does it with `mire_trim_padding` (default: on with `mire_packed_varlen`).
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

MULTIPLE = 8  # LLaMA-Factory's SFT collator pads to a multiple of 8 (pad_to_multiple_of)
# arguments whose last axis is the tokens' (Qwen2-VL's position_ids: (3, B, L) for mrope, or (B, L))
TOKEN_AXIS_KEYS = ("input_ids", "labels", "position_ids", "token_type_ids", "mm_token_type_ids")


def real_tokens(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: the positions of a 4D packed mask (B, 1, L, L; additive, or bool where True is visible) that are
    real tokens. A real token sees itself; padding sees nothing."""
    diagonal = mask[:, 0].diagonal(dim1=-2, dim2=-1)
    return diagonal if mask.dtype == torch.bool else diagonal == 0


def real_length(mask: torch.Tensor) -> int:
    """One past the last real token of any row of a 4D packed mask."""
    positions = torch.nonzero(real_tokens(mask).any(0)).flatten()
    return int(positions.max()) + 1 if positions.numel() else 0


def trimmed(kwargs: dict) -> dict | None:
    """kwargs with the trailing padding cut, or None where nothing is cut (not packed, already tight, or an argument
    along the tokens that this does not know)."""
    mask = kwargs.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[-1] != mask.shape[-2]:
        return None
    length = mask.shape[-1]
    new_length = min(length, -(-real_length(mask) // MULTIPLE) * MULTIPLE)
    if new_length in (0, length):
        return None
    out = dict(kwargs)
    for key, value in kwargs.items():
        if not isinstance(value, torch.Tensor) or key == "attention_mask":
            continue
        if key in TOKEN_AXIS_KEYS and value.shape[-1] == length:
            out[key] = value[..., :new_length]
        elif key in TOKEN_AXIS_KEYS or (value.dim() >= 2 and value.shape[-1] == length and key != "pixel_values"):
            logger.warning("packed batch not trimmed: %s has shape %s against %d tokens", key, tuple(value.shape),
                           length)
            return None
    out["attention_mask"] = mask[..., :new_length, :new_length]
    return out


def enable(model, counts: dict | None = None) -> None:
    """Register the trimming pre-hook on the model (once). `counts`, when given, adds up the token positions of the
    training calls as given ("given") and as run ("run")."""
    if getattr(model, "_mire_trim_padding", False):
        return

    def trim(module, args, kwargs):
        if not module.training or args:
            return None
        out = trimmed(kwargs)
        if counts is not None and isinstance(kwargs.get("input_ids"), torch.Tensor):
            counts["given"] = counts.get("given", 0) + kwargs["input_ids"].numel()
            counts["run"] = counts.get("run", 0) + (out or kwargs)["input_ids"].numel()
        return None if out is None else (args, out)

    model.register_forward_pre_hook(trim, with_kwargs=True)
    model._mire_trim_padding = True


def callback():
    """A TrainerCallback that calls `enable` on the model when training begins; its `counts` add up the token
    positions given and run."""
    from transformers import TrainerCallback

    class MireTrimPadding(TrainerCallback):
        def __init__(self):
            self.counts: dict = {}

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            enable(model, self.counts)
            logger.warning("packed batches: trailing padding trimmed (mire_trim_padding)")

    return MireTrimPadding()
