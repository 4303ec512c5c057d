import json
import os
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

from conftest import REPO, call_tool, run_tool
from mire_factory.content import to_content_parts
from mire_factory.records import load_records
from mire_factory.tiny_model import PRESETS, SPECIAL_TOKEN_IDS


def test_cli_builds_fast_and_loads(tmp_path):
    start = time.perf_counter()
    proc = run_tool("make_tiny_model", "--out", tmp_path / "m", "--preset", "tiny")
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    assert elapsed < 20, f"tiny build took {elapsed:.1f}s (including interpreter start)"
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "qwen2_vl"
    assert config["image_token_id"] == 151655 and config["vision_start_token_id"] == 151652
    assert config["video_token_id"] == 151656


def test_num_hidden_layers_changes_only_the_depth(tmp_path):
    """run.sh's MODEL_LAYERS: a 7B-wide model with fewer layers fits an 80 GB GPU, so what does not depend on depth
    (the embeddings' optimizer states) can be timed there."""
    proc = run_tool("make_tiny_model", "--out", tmp_path / "m", "--preset", "demo", "--num_hidden_layers", "1")
    assert proc.returncode == 0, proc.stderr
    assert "with 1 language-model layers" in proc.stdout
    text = json.loads((tmp_path / "m" / "config.json").read_text())["text_config"]
    demo = PRESETS["demo"]
    assert text["num_hidden_layers"] == 1 and len(text["layer_types"]) == 1 and demo.num_hidden_layers != 1
    assert (text["hidden_size"], text["intermediate_size"]) == (demo.hidden_size, demo.intermediate_size)
    model = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "m")
    assert len(model.model.language_model.layers) == 1
    for bad in ("0", "-2"):
        proc = call_tool("make_tiny_model", "--out", tmp_path / "bad", "--num_hidden_layers", bad)
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines() == [f"error: --num_hidden_layers {bad}: give 1 or more, with a "
                                                    "preset of random weights"]
    assert not (tmp_path / "bad").exists()


def test_tiny_model_loads_and_generates_with_an_image(tiny_model_dir):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir)
    tok = processor.tokenizer
    for token, token_id in SPECIAL_TOKEN_IDS.items():
        assert tok.convert_tokens_to_ids(token) == token_id
    assert tok.eos_token_id == 151645
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "请分类"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "<|vision_start|><|image_pad|><|vision_end|>请分类<|im_end|>" in text
    image = Image.new("RGB", (112, 84), (200, 30, 30))
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    # 112x84 -> smart_resize 112x84 -> (8x6 patches) / 2x2 merge = 12 image tokens
    assert int((inputs["input_ids"] == 151655).sum()) == 12
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4 or int(out[0, -1]) in (151645, 151643)
    assert torch.equal(out[0, : inputs["input_ids"].shape[1]], inputs["input_ids"][0])


def test_real_sample_token_counts(mire_sample, tiny_model_dir):
    """Per-record text + image tokens of the 24 real records with the tiny model's (real) processor."""
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    records = load_records(mire_sample / "train_sample.json", mire_sample / "images")
    counts = {}
    for record in records:
        parts = to_content_parts(record, mire_sample / "images")
        content = [{"type": "image"} if p["type"] == "image" else p for p in parts]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
        images = [Image.open(p["image"]).convert("RGB") for p in parts if p["type"] == "image"]
        inputs = processor(text=[text], images=images or None, return_tensors="pt")
        n_image = int((inputs["input_ids"] == 151655).sum())
        expected = sum(int(t.prod()) // 4 for t in inputs["image_grid_thw"]) if images else 0
        assert n_image == expected
        assert (n_image > 0) == bool(record.images)
        counts[record.id] = (inputs["input_ids"].shape[1], n_image)
    assert len(counts) == 24
    assert all(total > 100 for total, _ in counts.values())
    longest = max(total for total, _ in counts.values())
    assert 3000 < longest < 20000, longest  # the 4-image dialogue at the default max_pixels


REAL_GGUF = Path(os.environ.get("MIRE_GGUF", REPO / ".real_models" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"))


def test_real_preset_needs_a_gguf_file(tmp_path):
    proc = call_tool("make_tiny_model", "--out", tmp_path / "m", "--preset", "real-0.5b")
    assert proc.returncode == 2 and "needs --gguf" in proc.stderr
    proc = call_tool("make_tiny_model", "--out", tmp_path / "m", "--preset", "real-0.5b", "--gguf",
                     tmp_path / "x.gguf")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'x.gguf'}: GGUF file not found "
                                                "(benchmarks/quality/fetch_gguf.py)"]
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
@pytest.mark.skipif(not REAL_GGUF.is_file(), reason=f"no GGUF at {REAL_GGUF} (benchmarks/quality/fetch_gguf.py)")
def test_real_05b_text_logits_equal_the_gguf_llm(tmp_path):
    """The built Qwen2-VL answers a text-only Chinese prompt with exactly the GGUF language model's logits (both bf16),
    and its checkpoint has Qwen2-VL's key layout, the GGUF's rope/eps/tying and a small random vision tower."""
    from safetensors import safe_open

    from mire_factory.tiny_model import load_gguf_llm

    out = tmp_path / "real"
    run_tool("make_tiny_model", "--out", out, "--preset", "real-0.5b", "--gguf", REAL_GGUF, check=True, timeout=1200)
    config = json.loads((out / "config.json").read_text())
    text = config["text_config"]
    assert (text["hidden_size"], text["num_attention_heads"], text["num_key_value_heads"]) == (896, 14, 2)
    assert (text["intermediate_size"], text["num_hidden_layers"]) == (4864, 24)
    assert text["rope_parameters"]["mrope_section"] == [8, 12, 12]
    assert text["rope_parameters"]["rope_theta"] == 1000000.0 and abs(text["rms_norm_eps"] - 1e-6) < 1e-12
    assert config["tie_word_embeddings"] is False  # the GGUF carries its own output.weight
    assert config["vision_config"]["hidden_size"] == 896 and config["vision_config"]["depth"] == 2
    with safe_open(out / "model.safetensors", "pt") as fh:
        keys = set(fh.keys())
        assert fh.get_tensor("lm_head.weight").dtype == torch.bfloat16
    # transformers writes the released Qwen2-VL checkpoints' layout (model.layers.*, visual.*), mapping it to
    # model.language_model.* / model.visual.* on load
    assert {"model.layers.23.mlp.down_proj.weight", "lm_head.weight", "visual.merger.mlp.2.weight"} <= keys
    assert len([k for k in keys if k.startswith("model.")]) == 290 and all(k.startswith(("model.", "visual.", "lm_head"))
                                                                           for k in keys)

    vl = Qwen2VLForConditionalGeneration.from_pretrained(out, dtype=torch.bfloat16).eval()
    llm = load_gguf_llm(REAL_GGUF).eval()
    processor = AutoProcessor.from_pretrained(out)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": "用户: 内胆使用的是316不锈钢吗？请判断用户的意图分类标签。"}],
        add_generation_prompt=True, tokenize=False)
    inputs = processor.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        ours, theirs = vl(**inputs).logits, llm(**inputs).logits
    assert torch.equal(ours, theirs), float((ours.float() - theirs.float()).abs().max())
    with torch.no_grad():
        answer = vl.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert any("\u4e00" <= ch <= "\u9fff" for ch in processor.tokenizer.decode(answer))  # a real model: Chinese back

    # image tokens come out at the text embeddings' size (the random merger is rescaled)
    image = Image.new("RGB", (224, 224), (240, 240, 240))
    pixels = processor.image_processor(images=[image], return_tensors="pt")
    with torch.no_grad():
        tokens = vl.model.get_image_features(pixels["pixel_values"], pixels["image_grid_thw"]).pooler_output[0]
        text_rms = vl.model.language_model.embed_tokens.weight.float().pow(2).mean().sqrt()
    assert 0.5 < float(tokens.float().pow(2).mean().sqrt() / text_rms) < 2
