"""Qwen2-VL's multimodal rotary positions (mrope) in generate(): the positions training used.

Training: LLaMA-Factory's collator gives every sequence the model's `get_rope_index` positions: an image's tokens
on a (time, height, width) grid, the text after it continuing from the grid's largest index (a 6x6-token image
advances the text by 6 positions, not 36). Since transformers 5.3 (huggingface/transformers#43972, "Unify 3D position
ids"; LLaMA-Factory 0.9.5 allows up to 5.6.0) generate() computes them only when it is also given `mm_token_type_ids`
(which tokens are image or video tokens; its processors return them with the input ids). Without them it falls back,
silently, to 1D positions (0, 1, 2, ... over image tokens too): every token after an image then sits at another
position than in training. The demo's model answered 物流页面-物流页面 for 物流页面-物流跟踪页面 that way, though it
had learned the label (teacher-forced it was right; given these ids, generate() is right too).
"""

from __future__ import annotations

import inspect


def mrope_generate_kwargs(model, processor, input_ids) -> dict:
    """{"mm_token_type_ids": ...} for generate() when the model's position function takes them, else {} (a model
    without mrope, or transformers before 5.3, which derives the positions from the input ids alone).

    model: the model generate() is called on (wrappers such as PEFT's are searched); processor: its processor;
    input_ids: the (left-padded) batch of prompt ids."""
    rope_index = next((m.get_rope_index for m in model.modules() if hasattr(m, "get_rope_index")), None)
    if rope_index is None or "mm_token_type_ids" not in inspect.signature(rope_index).parameters:
        return {}
    import torch

    types = processor.create_mm_token_type_ids(input_ids.tolist())  # transformers' own, as its processors call it
    return {"mm_token_type_ids": torch.tensor(types, dtype=torch.long, device=input_ids.device)}
