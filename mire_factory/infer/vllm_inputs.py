"""Everything vLLM is given, built without vLLM: engine arguments, prompts, sampling and guided-decoding fields.

The CPU tests check these; vllm_backend.py only turns them into vLLM objects.
"""

from __future__ import annotations

from .answer import AnswerFormat, guided_decoding
from .truncation import Plan

COMPETITION_MAX_NEW_TOKENS = 100


def engine_kwargs(
    model: str,
    plans: list[Plan],
    cutoff_len: int,
    max_new_tokens: int,
    adapter: str | None = None,
    tensor_parallel_size: int = 1,
    seed: int = 0,
    max_lora_rank: int = 64,
) -> dict:
    """vllm.LLM arguments: max_model_len from the budget, limit_mm_per_prompt from the planned data."""
    longest = max((p.n_tokens for p in plans), default=0)
    most_images = max((len(p.images) for p in plans), default=0)
    kwargs = {
        "model": model,
        "trust_remote_code": True,
        "dtype": "auto",
        "seed": seed,
        "tensor_parallel_size": tensor_parallel_size,
        "max_model_len": max(cutoff_len, longest) + max_new_tokens,
        "limit_mm_per_prompt": {"image": max(1, most_images), "video": 0},
        "disable_log_stats": True,
    }
    if adapter:
        kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank)
    return kwargs


def sampling_kwargs(
    task: str,
    max_new_tokens: int,
    stop_token_ids: list[int],
    constrained: bool = False,
    answer_format: AnswerFormat = "label",
    label_position: str = "last",
) -> dict:
    """SamplingParams fields for one task (greedy); "guided" holds GuidedDecodingParams fields or None."""
    return {
        "temperature": 0.0,
        "top_p": 1.0,
        "max_tokens": max_new_tokens,
        "stop_token_ids": sorted(stop_token_ids),
        "skip_special_tokens": True,
        "guided": guided_decoding(task, answer_format, label_position) if constrained else None,
    }


def prompt_input(prompt_ids: list[int], images: list, plugin=None, image_max_pixels: int = 768 * 768,
                 image_min_pixels: int = 32 * 32) -> dict:
    """vLLM's TokensPrompt: ids with one pad token per image; images pre-resized as LLaMA-Factory does in training.

    `plugin` None leaves the images as paths (for inspection without loading them).
    """
    out: dict = {"prompt_token_ids": list(prompt_ids)}
    if images:
        if plugin is not None:
            images = plugin._regularize_images(
                images, image_max_pixels=image_max_pixels, image_min_pixels=image_min_pixels
            )["images"]
        out["multi_modal_data"] = {"image": list(images)}
    return out
