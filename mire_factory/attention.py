"""Causal attention without a mask for right-padded training batches: the language model's SDPA calls run the flash
kernel instead of the memory-efficient one.

Why: LLaMA-Factory's SFT collator pads every training batch to a multiple of 8 (`pad_to_multiple_of=8`), even a
batch of one record, so transformers' `sdpa_mask` nearly always sees padding and builds a dense boolean mask; with a
mask, PyTorch's SDPA cannot use its flash kernel and runs the memory-efficient one. On one H200 that kernel was half
of the GPU's time in a 7B step on the 11-image dialogues (BENCHMARKS.md, issue 20, eighth lease: profiles in
benchmarks/gpu/results/h200/issue20_lease8/).
Why it is exact: training pads on the right, so every padding position comes after every real token of its row, and
a causal mask already hides later positions from each real query. Real tokens attend to the same keys with or without
the padding mask; only padding queries (whose labels are ignored) see other padding. Anything else (left padding,
decoding with a cache, packed sequences' block masks, LLaMA-Factory's 4D masks, tracing) keeps transformers' own mask.

`enable(model)` switches a Qwen2-VL's language model to it (the vision tower keeps its own attention);
`mire_factory.train` and benchmarks/gpu/train_bench.py do it with `mire_right_pad_causal=true`.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

NAME = "sdpa_right_pad_causal"


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """Every row of a 2D padding mask is real tokens then padding (non-increasing)."""
    mask = attention_mask.to(torch.int8)
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def right_pad_causal_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                          mask_function=None, attention_mask: torch.Tensor | None = None, **kwargs):
    """transformers' `sdpa_mask`, except that a right-padded causal training batch gets no mask (None: SDPA's
    is_causal)."""
    from transformers.masking_utils import causal_mask_function, is_tracing, sdpa_mask

    mask_function = mask_function or causal_mask_function
    # allow_is_causal_skip=False: transformers wants the mask materialized (a compiled static cache, packed sequences)
    if (kwargs.get("allow_is_causal_skip", True) and mask_function is causal_mask_function
            and attention_mask is not None and attention_mask.dim() == 2
            and not is_tracing(attention_mask) and q_offset == 0 and kv_offset == 0 and q_length == kv_length
            and attention_mask.shape[-1] == kv_length and is_right_padded(attention_mask)):
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, **kwargs)


def register() -> None:
    """The attention implementation NAME: transformers' SDPA forward with the mask above."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, sdpa_attention_forward)
    AttentionMaskInterface.register(NAME, right_pad_causal_mask)


def enable(model) -> bool:
    """Switch the language model's attention to NAME when it runs transformers' sdpa; False (and a log line) when
    it runs anything else (eager, flash-attn), which is left as it is."""
    config = getattr(model.config, "text_config", None) or model.config
    if config._attn_implementation != "sdpa":
        logger.warning("right-padded causal attention not enabled: the language model runs %r, not sdpa",
                       config._attn_implementation)
        return False
    register()
    key = "text_config" if getattr(model.config, "text_config", None) is not None else ""
    model.set_attn_implementation({key: NAME})
    return True


def callback():
    """A TrainerCallback that calls `enable` on the model when training begins (after LLaMA-Factory loaded it)."""
    from transformers import TrainerCallback

    class RightPadCausalAttention(TrainerCallback):
        enabled = False

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.enabled = enable(model)
            if self.enabled:
                logger.warning("language model attention: %s (no mask for right-padded batches)", NAME)

    return RightPadCausalAttention()
