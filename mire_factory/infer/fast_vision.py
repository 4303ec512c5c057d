"""Qwen2-VL's vision tower for batched inference on a GPU: one varlen attention call and compiled blocks.

With SDPA, transformers runs the vision attention one image at a time, and every block spends much of its time in
unfused elementwise work (the rotary embedding in float32, quick-GELU, norms, residuals). Here the tower's
attention goes through PyTorch's own FlashAttention varlen kernel (`torch.nn.attention.varlen`, no extra package)
over all images of a batch at once, and each block is `torch.compile`d with dynamic shapes, which fuses the
elementwise work between the matmuls: 118 screenshots took 1.70 s instead of 2.41 s on an H100.
The weights and the math are the model's own; only the kernels change.
"""

from __future__ import annotations

VARLEN_ATTENTION = "flash_varlen_torch"  # transformers passes cu_seqlens to implementations named "*flash*"


def varlen_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                     cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None, **kwargs):
    """transformers' attention interface over packed sequences ([1, heads, tokens, dim], non-causal, no mask).

    Returns [1, tokens, heads, dim], as flash_attention_2 does. Off CUDA (tests) it runs SDPA per sequence.
    """
    import torch

    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [tokens, heads, dim]
    if q.is_cuda:
        from torch.nn.attention.varlen import varlen_attn

        out = varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu_seq_lens_q, cu_seq_lens_k,
                          int(max_length_q), int(max_length_k), scale=scaling)
    else:
        bounds = cu_seq_lens_q.tolist()
        out = torch.cat([  # 4-D, as transformers' SDPA path passes them: 3-D inputs take a slow kernel on the CPU
            torch.nn.functional.scaled_dot_product_attention(
                *(t[:, :, a:b] for t in (query, key, value)), scale=scaling)[0].transpose(0, 1)
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
    return out.unsqueeze(0), None


def _register() -> None:
    import torch
    from transformers import AttentionInterface

    # kept out of the compiled graphs: the varlen call reads its max lengths as Python ints
    AttentionInterface.register(VARLEN_ATTENTION, torch.compiler.disable(varlen_attention))


def speed_up_vision_tower(model, compile_blocks: bool = True) -> None:
    """Varlen attention for the vision tower of a loaded Qwen2-VL model; its blocks compiled (dynamic shapes)."""
    _register()
    visual = model.model.visual
    visual.config._attn_implementation = VARLEN_ATTENTION
    if compile_blocks:
        for block in visual.blocks:
            block.compile(dynamic=True)
