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


def two_steps(model_dir, data_dir, out, *extra) -> list[tuple[float, float]]:
    """(loss, grad_norm) of each of two real optimizer steps of `python -m mire_factory.train` (run in-process)."""
    from conftest import call_main
    from mire_factory import train

    proc = call_main(train.main, "configs/qwen2_vl_2b_full_sft.yaml", f"model_name_or_path={model_dir}",
                     f"dataset_dir={data_dir}", f"output_dir={out}", "bf16=false", "eval_strategy='no'",
                     "image_max_pixels=12544", "preprocessing_num_workers=1", "dataloader_num_workers=0", "max_steps=2",
                     "gradient_accumulation_steps=1", "logging_steps=1", "save_strategy='no'", "plot_loss=false",
                     "learning_rate=1e-3", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [(e["loss"], e["grad_norm"]) for e in logged if "grad_norm" in e]


def test_a_training_with_it_logs_the_same_losses_and_gradient_norms(tiny_model_dir, tiny_train_data, tmp_path,
                                                                   monkeypatch):
    """Two real optimizer steps through `python -m mire_factory.train` (batches of 2 records, right-padded by
    LLaMA-Factory's collator), with and without mire_right_pad_causal: the same loss and grad_norm at each step."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    history = {flag: two_steps(tiny_model_dir, tiny_train_data, tmp_path / flag, "per_device_train_batch_size=2",
                               f"mire_right_pad_causal={flag}") for flag in ("false", "true")}
    assert len(history["true"]) == 2
    for (loss_off, norm_off), (loss_on, norm_on) in zip(history["false"], history["true"], strict=True):
        assert loss_on == pytest.approx(loss_off, rel=1e-4) and norm_on == pytest.approx(norm_off, rel=1e-4)


def lf_packed_mask(indices: list[list[int]]) -> torch.Tensor:
    """LLaMA-Factory's own 4D mask for neat_packing (record numbers per token, 0 = padding)."""
    from llamafactory.data.collator import prepare_4d_attention_mask

    return prepare_4d_attention_mask(torch.tensor(indices), torch.float32)


def test_records_are_read_off_llamafactorys_packed_mask_and_other_masks_are_refused():
    mask = lf_packed_mask([[1, 1, 1, 2, 2, 3, 3, 3, 0, 0], [1, 1, 1, 1, 1, 1, 2, 2, 2, 2]])
    assert attention.packed_records(mask).tolist() == [0, 3, 5, 8, 9, 10, 16, 20]
    # a sliding window (not block-diagonal), a full causal mask with a hole, a 2D mask: not packing
    window = torch.ones(8, 8, dtype=torch.bool).tril() & ~torch.ones(8, 8, dtype=torch.bool).tril(-3)
    assert attention.packed_records(window[None, None]) is None
    holed = lf_packed_mask([[1] * 8])
    holed[0, 0, 6, 2] = torch.finfo(torch.float32).min
    assert attention.packed_records(holed) is None
    assert attention.packed_records(torch.ones(1, 8)) is None


def test_packed_records_attend_as_under_the_dense_mask():
    """The per-record path against transformers' SDPA with LLaMA-Factory's mask, grouped-query heads included, for
    every non-padding token; gradients too."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    indices = [[1] * 5 + [2] * 7 + [3] * 3 + [0] * 1, [1] * 9 + [2] * 7]
    mask = lf_packed_mask(indices)
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True, training=True)
    torch.manual_seed(0)
    q = torch.randn(2, 4, 16, 8, requires_grad=True)
    k, v = torch.randn(2, 2, 16, 8, requires_grad=True), torch.randn(2, 2, 16, 8, requires_grad=True)
    dense, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    packed, _ = attention.packed_varlen_attention(module, q, k, v, mask, scaling=0.3)
    real = torch.tensor(indices) > 0
    torch.testing.assert_close(packed[real], dense[real])
    grads = [torch.autograd.grad(out[real].square().sum(), (q, k, v)) for out in (dense, packed)]
    for g_dense, g_packed in zip(*grads, strict=True):
        torch.testing.assert_close(g_packed, g_dense)


def test_a_packed_training_with_it_logs_the_same_losses(tiny_model_dir, tiny_train_data, tmp_path, monkeypatch):
    """Two optimizer steps of neat_packing through `python -m mire_factory.train`, with and without
    mire_packed_varlen: the per-record path ran, and the losses and gradient norms are the dense mask's."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    calls = collections.Counter()
    records_attention = attention._records_attention

    def counted(*args, **kwargs):
        calls["records"] += 1
        return records_attention(*args, **kwargs)

    monkeypatch.setattr(attention, "_records_attention", counted)
    history = {}
    for flag in ("false", "true"):
        history[flag] = two_steps(tiny_model_dir, tiny_train_data, tmp_path / flag, "per_device_train_batch_size=1",
                                  "neat_packing=true", "cutoff_len=1024", f"mire_packed_varlen={flag}")
        assert (calls["records"] > 0) is (flag == "true")
    assert len(history["true"]) == 2
    for (loss_off, norm_off), (loss_on, norm_on) in zip(history["false"], history["true"], strict=True):
        assert loss_on == pytest.approx(loss_off, rel=1e-4) and norm_on == pytest.approx(norm_off, rel=1e-4)
