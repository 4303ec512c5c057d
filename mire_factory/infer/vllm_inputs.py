"""Everything vLLM is given, built without vLLM: engine arguments, prompts, images, sampling and structured outputs.

The CPU tests check these; vllm_backend.py only turns them into vLLM objects (written against vLLM 0.24.0).
"""

from __future__ import annotations

import json
import os

from ..io import MireInputError
from .answer import AnswerFormat, guided_decoding
from .truncation import Plan

# vLLM runs a model's multimodal processor in the API process. Its offline `LLM` class does that serially, one
# prompt after the other; the async engine (AsyncLLM, what `vllm serve` runs) spreads it over this many threads.
# vLLM refuses its multimodal processor cache with more than one thread; the cache only pays when the same image
# comes back, and each image is seen about once per test set.
DEFAULT_RENDERER_WORKERS = 8


def engine_kwargs(
    model: str,
    plans: list[Plan],
    cutoff_len: int,
    max_new_tokens: int,
    adapter: str | None = None,
    tensor_parallel_size: int = 1,
    seed: int = 0,
    max_lora_rank: int = 64,
    renderer_workers: int = DEFAULT_RENDERER_WORKERS,
    extra: dict | None = None,
) -> dict:
    """vLLM engine arguments (AsyncEngineArgs fields): max_model_len from the budget, limit_mm_per_prompt from the
    planned data; `extra` (tools.vllm_infer --vllm_engine_args) overrides any of them."""
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
        "renderer_num_workers": renderer_workers,
        "mm_processor_cache_gb": 0 if renderer_workers > 1 else 4,
        "disable_log_stats": True,
    }
    if adapter:
        kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank)
    kwargs.update(extra or {})
    return kwargs


def sampling_kwargs(
    task: str,
    max_new_tokens: int,
    stop_token_ids: list[int],
    constrained: bool = False,
    answer_format: AnswerFormat = "label",
    label_position: str = "last",
    max_reason_chars: int | None = None,
    min_new_tokens: int = 0,
) -> dict:
    """SamplingParams fields for one task (greedy); "structured_outputs" holds StructuredOutputsParams fields or None.

    min_new_tokens (benchmarks only) fixes the output length, as the hf backend's min_new_tokens does.
    """
    fields = {
        "temperature": 0.0,
        "top_p": 1.0,
        "max_tokens": max_new_tokens,
        "stop_token_ids": sorted(stop_token_ids),
        "skip_special_tokens": True,
        "structured_outputs": guided_decoding(task, answer_format, label_position, max_new_tokens, max_reason_chars)
        if constrained else None,
    }
    if min_new_tokens:
        fields["min_tokens"] = min_new_tokens
    return fields


def image_uuids(paths: list[str], image_max_pixels: int, image_min_pixels: int) -> list[str]:
    """vLLM identifies each image by this string instead of hashing its pixels (prefix and encoder caches): the file
    and the resize that made the pixels."""
    return [f"{os.path.abspath(p)}|{image_max_pixels}|{image_min_pixels}" for p in paths]


def regularized_images(plugin, paths: list[str], image_max_pixels: int, image_min_pixels: int) -> list:
    """The images as training sees them before the processor: mm_plugin's own loading and max-pixel resize, decoded
    here (in the caller's thread), so that vLLM's processor neither decodes nor resizes a full-size screenshot."""
    images = plugin._regularize_images(paths, image_max_pixels=image_max_pixels,
                                       image_min_pixels=image_min_pixels)["images"]
    for image in images:
        image.load()
    return images


def prompt_input(prompt_ids: list[int], images: list, uuids: list[str] | None = None) -> dict:
    """vLLM's TokensPrompt: ids with one pad token per image (vLLM expands each to the image's token count)."""
    out: dict = {"prompt_token_ids": list(prompt_ids)}
    if images:
        out["multi_modal_data"] = {"image": list(images)}
        if uuids:
            out["multi_modal_uuids"] = {"image": list(uuids)}
    return out


def vllm_engine_args(args) -> dict:
    """--vllm_engine_args as a dict (a JSON object of vLLM engine arguments, e.g. '{"max_num_seqs": 512}')."""
    if not args.vllm_engine_args:
        return {}
    try:
        extra = json.loads(args.vllm_engine_args)
    except json.JSONDecodeError as exc:
        raise MireInputError(f"--vllm_engine_args: not valid JSON ({exc.msg})") from None
    if not isinstance(extra, dict):
        raise MireInputError("--vllm_engine_args: expected a JSON object of engine arguments")
    return extra
