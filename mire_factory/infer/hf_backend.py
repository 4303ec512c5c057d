"""The transformers backend: batched, length-sorted, left-padded generation with LLaMA-Factory's model loader."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .render import Components, expand_image_tokens


@dataclass
class GenItem:
    prompt_ids: list[int]  # one image-pad token per image
    images: list[str]
    task: str


def load_hf_model(comp: Components):
    """LLaMA-Factory's loader: the same dtype, attention and adapter handling as `llamafactory-cli`."""
    from llamafactory.model import load_model

    model = load_model(comp.tokenizer, comp.model_args, comp.finetuning_args, is_trainable=False)
    model.eval()
    return model


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (padding stays small, OOM shows early)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[k : k + batch_size] for k in range(0, len(order), batch_size)]


def generate_batch(model, comp: Components, items: list[GenItem], max_new_tokens: int, constraints=None,
                   min_new_tokens: int = 0) -> list[str]:
    """Greedy answers for one batch; `constraints` (AnswerConstraints) restricts each row to its task's answers.

    min_new_tokens (benchmarks only) fixes the output length so that timings compare like with like.
    """
    import torch

    tokenizer, processor, plugin = comp.tokenizer, comp.processor, comp.template.mm_plugin
    images = [img for item in items for img in item.images]
    mm = plugin._get_mm_inputs(images, [], [], processor) if images else {}
    counts = [int(g.prod()) // comp.merge_length for g in mm.get("image_grid_thw", [])]
    rows, k = [], 0
    for item in items:
        n = len(item.images)
        rows.append(expand_image_tokens(item.prompt_ids, comp.image_pad_id, counts[k : k + n]))
        k += n
    width = max(len(r) for r in rows)
    pad_id = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long)
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    stop_ids = comp.template.get_stop_token_ids(tokenizer)
    kwargs = {}
    if mm:
        kwargs["pixel_values"] = mm["pixel_values"].to(model.device, dtype=model.dtype)
        kwargs["image_grid_thw"] = mm["image_grid_thw"].to(model.device)
    if constraints is not None:
        from transformers import LogitsProcessorList

        from .constrained import GrammarLogitsProcessor, make_prefix_allowed_tokens_fn

        if constraints.answer_format == "label":
            tries = [constraints.tries[item.task] for item in items]
            kwargs["prefix_allowed_tokens_fn"] = make_prefix_allowed_tokens_fn(tries, width, pad_id)
        else:
            grammars = [constraints.grammars[item.task] for item in items]
            processor_ = GrammarLogitsProcessor(grammars, width, tokenizer, comp.stop_id, max_new_tokens)
            kwargs["logits_processor"] = LogitsProcessorList([processor_])
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids.to(model.device),
            attention_mask=attention_mask.to(model.device),
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens or None,
            do_sample=False,
            num_beams=1,
            eos_token_id=stop_ids,
            pad_token_id=pad_id,
            **kwargs,
        )
    return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
