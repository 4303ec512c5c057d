"""mire_factory/label_logits.py: training computes the output layer at the label positions only, and the loss and
the gradients are what the full logits give; evaluation and generation see the full forward."""

from __future__ import annotations

import json

import pytest
import torch

from mire_factory import label_logits


def test_label_positions_are_the_union_of_the_rows_next_token_labels():
    labels = torch.tensor([[-100, -100, 5, 6, -100, -100],
                           [-100, -100, -100, -100, 7, 8]])
    keep, shifted = label_positions = label_logits.label_positions(labels)
    assert keep.tolist() == [1, 2, 3, 4]  # position p predicts token p + 1
    assert shifted.tolist() == [[5, 6, -100, -100], [-100, -100, 7, 8]]
    assert label_positions[0].dtype == torch.long


@pytest.fixture
def model(tiny_model_dir):
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32)


def batch():
    """Two right-padded rows whose answers sit at different positions."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(100, 5000, (2, 40), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 31:] = 0
    labels = torch.full_like(input_ids, -100)
    labels[0, 35:40] = input_ids[0, 35:40]
    labels[1, 27:31] = input_ids[1, 27:31]
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def loss_and_grads(model, **extra):
    model.zero_grad()
    out = model(**batch(), **extra)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("num_items_in_batch", [None, torch.tensor(20)])
def test_the_loss_and_gradients_are_the_full_logits_ones(model, monkeypatch, num_items_in_batch):
    extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    model.train()
    full, full_grads = loss_and_grads(model, **extra)
    assert full.logits.shape[:2] == (2, 40)
    rows = []
    lm_head = model.lm_head.forward
    monkeypatch.setattr(model.lm_head, "forward", lambda h: rows.append(h.shape[1]) or lm_head(h))
    assert label_logits.enable(model) and label_logits.enable(model)  # a second enable wraps nothing more
    kept, kept_grads = loss_and_grads(model, **extra)
    assert rows == [9]  # positions 26..29 and 34..38, the union of the rows, in one call: not 40 positions
    assert kept.logits.shape[:2] == (2, 9)
    assert kept.loss.item() == pytest.approx(full.loss.item(), rel=1e-6)
    assert kept_grads.keys() == full_grads.keys()
    for name, grad in full_grads.items():
        torch.testing.assert_close(kept_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    model.eval()  # evaluation keeps every position's logits
    with torch.no_grad():
        assert model(**batch()).logits.shape[:2] == (2, 40)


def test_generate_runs_through_the_wrapped_forward(model):
    label_logits.enable(model)
    model.eval()
    ids = batch()["input_ids"][:1, :10]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 13)


def test_a_model_without_logits_to_keep_is_left_as_it_is():
    class Plain(torch.nn.Module):
        def forward(self, input_ids=None, labels=None):
            return input_ids

    plain = Plain()
    forward = plain.forward
    assert not label_logits.enable(plain)
    assert plain.forward == forward


def train_steps(model_dir, data_dir, out, *extra) -> list[tuple[float, float]]:
    """(loss, grad_norm) of each of two real optimizer steps of `python -m mire_factory.train` (in-process), each
    step two micro-batches of two records (the Trainer's num_items_in_batch path)."""
    from conftest import call_main
    from mire_factory import train

    proc = call_main(train.main, "configs/qwen2_vl_2b_full_sft.yaml", f"model_name_or_path={model_dir}",
                     f"dataset_dir={data_dir}", f"output_dir={out}", "bf16=false", "eval_strategy='no'",
                     "image_max_pixels=12544", "preprocessing_num_workers=1", "dataloader_num_workers=0", "max_steps=2",
                     "per_device_train_batch_size=2", "gradient_accumulation_steps=2", "logging_steps=1",
                     "save_strategy='no'", "plot_loss=false", "learning_rate=1e-3", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [(e["loss"], e["grad_norm"]) for e in logged if "grad_norm" in e]


def test_a_training_with_it_logs_the_same_losses_and_gradient_norms(tiny_model_dir, tiny_train_data, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    calls = []
    positions = label_logits.label_positions
    monkeypatch.setattr(label_logits, "label_positions", lambda labels: calls.append(labels.shape) or positions(labels))
    history = {}
    for flag in ("false", "true"):
        history[flag] = train_steps(tiny_model_dir, tiny_train_data, tmp_path / flag, f"mire_label_logits_only={flag}")
        # the label-only path took every micro-batch (2 steps, the first of 2 micro-batches), and only with the flag
        assert len(calls) >= 3 if flag == "true" else not calls
    assert len(history["true"]) == 2
    for (loss_off, norm_off), (loss_on, norm_on) in zip(history["false"], history["true"], strict=True):
        assert loss_on == pytest.approx(loss_off, rel=1e-4) and norm_on == pytest.approx(norm_off, rel=1e-4)


def test_it_and_liger_are_refused_together_in_one_line(tiny_model_dir, tiny_train_data, tmp_path):
    from conftest import call_main
    from mire_factory import train

    proc = call_main(train.main, "configs/qwen2_vl_2b_full_sft.yaml", f"model_name_or_path={tiny_model_dir}",
                     f"dataset_dir={tiny_train_data}", f"output_dir={tmp_path}", "use_liger_kernel=true",
                     "mire_label_logits_only=true")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "mire_label_logits_only" in lines[0] and "use_liger_kernel" in lines[0]
    assert "Traceback" not in proc.stderr
