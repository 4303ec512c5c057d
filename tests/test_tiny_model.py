import json
import time

import torch
from PIL import Image
from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

from conftest import run_tool
from mire_factory.content import to_content_parts
from mire_factory.records import load_records
from mire_factory.tiny_model import SPECIAL_TOKEN_IDS


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
