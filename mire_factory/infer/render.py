"""Prompts rendered through LLaMA-Factory's template and mm_plugin, exactly as its training pipeline renders them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

IMAGE_PAD = "<|image_pad|>"


@dataclass
class Components:
    """LLaMA-Factory's parsed arguments, tokenizer, processor and template for one model."""

    model_args: Any
    data_args: Any
    finetuning_args: Any
    generating_args: Any
    tokenizer: Any
    processor: Any
    template: Any

    @property
    def image_pad_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)

    @property
    def stop_id(self) -> int:
        """The token that ends an assistant turn (<|im_end|> for qwen2_vl)."""
        words = self.template.stop_words
        return self.tokenizer.convert_tokens_to_ids(words[0]) if words else self.tokenizer.eos_token_id

    @property
    def merge_length(self) -> int:
        return self.processor.image_processor.merge_size ** 2


def load_components(
    model_name_or_path: str,
    template: str = "qwen2_vl",
    adapter_name_or_path: str | None = None,
    image_max_pixels: int = 768 * 768,
    image_min_pixels: int = 32 * 32,
    cutoff_len: int = 4096,
    extra: dict | None = None,
) -> Components:
    """Parses arguments with LLaMA-Factory's own parser so defaults and checks are those of `llamafactory-cli`."""
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import get_infer_args
    from llamafactory.model import load_tokenizer

    args = {
        "model_name_or_path": model_name_or_path,
        "template": template,
        "image_max_pixels": image_max_pixels,
        "image_min_pixels": image_min_pixels,
        "cutoff_len": cutoff_len,
        "infer_backend": "huggingface",
        **({"adapter_name_or_path": adapter_name_or_path} if adapter_name_or_path else {}),
        **(extra or {}),
    }
    model_args, data_args, finetuning_args, generating_args = get_infer_args(args)
    module = load_tokenizer(model_args)
    tokenizer, processor = module["tokenizer"], module["processor"]
    tmpl = get_template_and_fix_tokenizer(tokenizer, data_args)
    return Components(model_args, data_args, finetuning_args, generating_args, tokenizer, processor, tmpl)


def render_prompt_ids(comp: Components, content: str, images: list, system: str | None = None) -> list[int]:
    """Prompt token ids with ONE image-pad token per image (the form vLLM expands itself).

    Same calls as LLaMA-Factory's SupervisedDatasetProcessor with an empty response; only the expansion of image
    tokens is left out, which does not change the tokenization of the text around them (they are special tokens).
    """
    plugin = dataclasses.replace(comp.template.mm_plugin, expand_mm_tokens=False)
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": ""}]
    messages = plugin.process_messages(messages, images, [], [], comp.processor)
    prompt_ids, _ = plugin.process_token_ids([], [], images, [], [], comp.tokenizer, comp.processor)
    ids, _ = comp.template.encode_oneturn(comp.tokenizer, messages, system, None)
    return prompt_ids + ids


def expand_image_tokens(ids: list[int], image_pad_id: int, counts: list[int]) -> list[int]:
    """Repeats the k-th image-pad token counts[k] times: the training form of the prompt."""
    out: list[int] = []
    k = 0
    for tok in ids:
        if tok == image_pad_id:
            out.extend([tok] * counts[k])
            k += 1
        else:
            out.append(tok)
    if k != len(counts):
        raise ValueError(f"{k} image tokens in the prompt but {len(counts)} image token counts")
    return out
