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

`enable(model, packed=True)` (`mire_packed_varlen=true`) adds packed sequences. With `neat_packing` and sdpa,
LLaMA-Factory hands the model a dense block-diagonal 4D mask, and SDPA's memory-efficient kernel computes the whole
L x L square (53% of a packed 7B step on the H200). NAME_PACKED reads the records' boundaries off that mask, checks
the mask is exactly block-diagonal causal, and runs PyTorch's variable-length flash kernel
(`torch.nn.attention.varlen.varlen_attn`, CUDA) over the records: only each record's own triangle. Any other mask
goes to transformers' SDPA as it is. On the CPU (no varlen kernel) the same records run one SDPA call each, which is
what the tests compare with the masked computation.
"""

from __future__ import annotations

import logging
import weakref

import torch

logger = logging.getLogger(__name__)

NAME = "sdpa_right_pad_causal"
NAME_PACKED = "sdpa_packed_varlen"


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


_last_packing: tuple | None = None  # (weakref to the mask, its version, its records): every layer gets the same mask


def cached_packed_records(mask: torch.Tensor) -> torch.Tensor | None:
    """packed_records, read once per forward pass rather than once per layer (an L x L check each)."""
    global _last_packing
    if _last_packing is not None and _last_packing[0]() is mask and _last_packing[1] == mask._version:
        return _last_packing[2]
    records = packed_records(mask)
    _last_packing = (weakref.ref(mask), mask._version, records)
    return records


def packed_records(mask: torch.Tensor) -> torch.Tensor | None:
    """Cumulative record boundaries (int32, over the flattened batch) of a 4D additive mask (B, 1, L, L) that is
    block-diagonal causal, as LLaMA-Factory's neat_packing builds it; None for any other mask. A row that sees
    nothing (padding) is a record of its own: its output is never trained on."""
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != mask.shape[3]:
        return None
    visible = mask[:, 0] == 0 if mask.dtype != torch.bool else mask[:, 0]
    batch, length = visible.shape[0], visible.shape[-1]
    # a record starts where a token cannot see the one before it
    starts = torch.ones(batch, length, dtype=torch.bool, device=mask.device)
    starts[:, 1:] = ~visible[:, 1:, :-1].diagonal(dim1=1, dim2=2)
    record = starts.cumsum(-1)
    expected = (record[:, :, None] == record[:, None, :]) & torch.ones(length, length, dtype=torch.bool,
                                                                       device=mask.device).tril()
    padding_rows = ~visible.any(-1)
    if not bool(((expected == visible) | padding_rows[:, :, None]).all()):
        return None
    offsets = torch.nonzero(starts.reshape(-1)).flatten()
    total = torch.tensor([batch * length], device=mask.device)
    return torch.cat([offsets, total]).to(torch.int32)


def _records_attention(query, key, value, cu_seq: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """Causal attention within each record of the flattened (T, H, D) tensors: PyTorch's varlen flash kernel on CUDA,
    one SDPA call a record elsewhere (the CPU, where that kernel does not exist)."""
    if query.is_cuda:
        from torch.nn.attention.varlen import varlen_attn

        max_len = int((cu_seq[1:] - cu_seq[:-1]).max())
        return varlen_attn(query, key, value, cu_seq, cu_seq, max_len, max_len, scale=scaling, window_size=(-1, 0))
    bounds = cu_seq.tolist()
    parts = [torch.nn.functional.scaled_dot_product_attention(
        query[a:b].transpose(0, 1), key[a:b].transpose(0, 1), value[a:b].transpose(0, 1), is_causal=True,
        scale=scaling).transpose(0, 1) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return torch.cat(parts)


def packed_varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                            scaling: float | None = None, **kwargs):
    """transformers' attention-function signature: query (B, H, L, D), key/value (B, H_kv, L, D); returns (B, L, H, D).
    Block-diagonal causal masks run per record; everything else is transformers' sdpa_attention_forward."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    cu_seq = None
    if attention_mask is not None and dropout == 0.0 and query.shape[2] == key.shape[2] > 1:
        cu_seq = cached_packed_records(attention_mask)
    if cu_seq is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    if query.is_cuda and torch.is_autocast_enabled("cuda"):
        # autocast does not reach a custom op: cast as it would for SDPA (the flash kernel takes bf16/fp16 only)
        dtype = torch.get_autocast_dtype("cuda")
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    elif query.is_cuda and query.dtype not in (torch.bfloat16, torch.float16):  # fp32 on a GPU: no flash kernel
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    batch, heads, length, dim = query.shape

    def flat(t):
        return t.transpose(1, 2).reshape(batch * length, heads, dim)

    out = _records_attention(flat(query), flat(key), flat(value), cu_seq, scaling)
    return out.reshape(batch, length, heads, dim), None


def register() -> None:
    """The attention implementations NAME (transformers' SDPA forward with the mask above) and NAME_PACKED (the same
    mask, and packed records through packed_varlen_attention)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, sdpa_attention_forward)
    AttentionMaskInterface.register(NAME, right_pad_causal_mask)
    AttentionInterface.register(NAME_PACKED, packed_varlen_attention)
    AttentionMaskInterface.register(NAME_PACKED, right_pad_causal_mask)


def enable(model, packed: bool = False) -> bool:
    """Switch the language model's attention to NAME (NAME_PACKED with packed=True) when it runs transformers' sdpa;
    False (and a log line) when it runs anything else (eager, flash-attn), which is left as it is."""
    config = getattr(model.config, "text_config", None) or model.config
    if config._attn_implementation != "sdpa":
        logger.warning("mire attention not enabled: the language model runs %r, not sdpa", config._attn_implementation)
        return False
    register()
    key = "text_config" if getattr(model.config, "text_config", None) is not None else ""
    model.set_attn_implementation({key: NAME_PACKED if packed else NAME})
    return True


def callback(packed: bool = False):
    """A TrainerCallback that calls `enable` on the model when training begins (after LLaMA-Factory loaded it);
    its `enabled` says whether it took, `packed` which implementation it asked for."""
    from transformers import TrainerCallback

    name = NAME_PACKED if packed else NAME

    class MireAttention(TrainerCallback):
        enabled = False

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.enabled = enable(model, packed)
            if self.enabled:
                logger.warning("language model attention: %s (no mask for right-padded batches%s)", name,
                               "; packed records one by one" if packed else "")

    instance = MireAttention()
    instance.packed = packed
    return instance
