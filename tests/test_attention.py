"""mire_factory/attention.py: the language model's attention without a mask for right-padded training batches gives
the real tokens exactly what transformers' masked SDPA gives them, and hands SDPA no mask (its flash kernel's
condition); left padding and other masks keep transformers' own mask."""

from __future__ import annotations

import collections
import json

import pytest
import torch

from mire_factory import attention


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Every scaled_dot_product_attention call: (heads, mask given, is_causal)."""
    calls = collections.Counter()
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        calls[(q.shape[1], attn_mask is not None, is_causal)] += 1
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


def logits(model, input_ids, mask):
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=mask).logits


@pytest.mark.parametrize("side", ["right", "left"])
def test_real_tokens_get_the_same_logits_and_right_padding_no_mask(tiny_model_dir, sdpa_calls, side):
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir, attn_implementation="sdpa",
                                                            dtype=torch.float32).eval()
    torch.manual_seed(0)
    input_ids = torch.randint(100, 5000, (2, 24))
    mask = torch.ones(2, 24, dtype=torch.long)
    pad = slice(17, None) if side == "right" else slice(0, 7)
    mask[1, pad] = 0
    before = logits(model, input_ids, mask)
    masked_calls = sum(n for (_, given, _), n in sdpa_calls.items() if given)
    assert masked_calls > 0  # transformers' sdpa builds a mask for any padding, the premise of the module
    sdpa_calls.clear()

    assert attention.enable(model) is True
    assert model.config.text_config._attn_implementation == attention.NAME
    assert model.config.vision_config._attn_implementation == "sdpa"  # the vision tower keeps its own
    after = logits(model, input_ids, mask)
    real = mask.bool()
    torch.testing.assert_close(after[real], before[real], rtol=1e-5, atol=1e-5)
    llm_calls = {key: n for key, n in sdpa_calls.items() if key[0] == model.config.text_config.num_attention_heads}
    if side == "right":
        assert llm_calls and all(not given and causal for (_, given, causal) in llm_calls)
    else:
        assert llm_calls and all(given for (_, given, _) in llm_calls)


def test_the_mask_function_skips_only_right_padded_causal_batches():
    from transformers.masking_utils import and_masks, causal_mask_function

    right = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    left = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    assert attention.is_right_padded(right) and not attention.is_right_padded(left)
    assert attention.right_pad_causal_mask(2, 4, 4, attention_mask=right) is None
    assert attention.right_pad_causal_mask(2, 4, 4, attention_mask=left) is not None
    # a cache (decoding): q_length 1 against 4 keys keeps the mask
    assert attention.right_pad_causal_mask(2, 1, 4, q_offset=3, attention_mask=right) is not None
    # a compiled static cache asks for a materialized mask: kept
    assert attention.right_pad_causal_mask(2, 4, 4, attention_mask=right, allow_is_causal_skip=False) is not None
    # a packed block mask (and_masks over causal) keeps the mask
    blocks = and_masks(causal_mask_function, lambda b, h, q, kv: (q < 2) == (kv < 2))
    packed = attention.right_pad_causal_mask(1, 4, 4, mask_function=blocks, attention_mask=right[:1],
                                             allow_is_causal_skip=False)  # as create_causal_mask asks for it
    assert packed is not None and not bool(packed[0, 0, 3, 0])


def test_a_training_with_it_logs_the_same_losses_and_gradient_norms(tiny_model_dir, tiny_train_data, tmp_path,
                                                                   monkeypatch):
    """Two real optimizer steps through `python -m mire_factory.train` (batches of 2 records, right-padded by
    LLaMA-Factory's collator), with and without mire_right_pad_causal: the same loss and grad_norm at each step."""
    from conftest import call_main
    from mire_factory import train

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    history = {}
    for flag in ("false", "true"):
        out = tmp_path / flag
        proc = call_main(train.main, "configs/qwen2_vl_2b_full_sft.yaml", f"model_name_or_path={tiny_model_dir}",
                         f"dataset_dir={tiny_train_data}", f"output_dir={out}", "bf16=false", "eval_strategy='no'",
                         "image_max_pixels=12544", "preprocessing_num_workers=1", "dataloader_num_workers=0",
                         "max_steps=2", "per_device_train_batch_size=2", "gradient_accumulation_steps=1",
                         "logging_steps=1", "save_strategy='no'", "plot_loss=false", "learning_rate=1e-3",
                         f"mire_right_pad_causal={flag}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        logged = json.loads((out / "trainer_state.json").read_text())["log_history"]
        history[flag] = [(e["loss"], e["grad_norm"]) for e in logged if "grad_norm" in e]
    assert len(history["true"]) == 2
    for (loss_off, norm_off), (loss_on, norm_on) in zip(history["false"], history["true"], strict=True):
        assert loss_on == pytest.approx(loss_off, rel=1e-4) and norm_on == pytest.approx(norm_off, rel=1e-4)
