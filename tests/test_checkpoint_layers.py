"""mire_factory/checkpoint_layers.py (`mire_checkpoint_layers=K`): with LLaMA-Factory's gradient checkpointing on,
only the first K language-model layers recompute their forward in backward; the vision tower is left as it was, the
math is unchanged, and bad values are refused in one line before anything loads."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from conftest import call_main
from mire_factory import checkpoint_layers
from mire_factory.io import MireInputError


def checkpointed_model(model_dir):
    """The tiny Qwen2-VL with gradient checkpointing enabled as LLaMA-Factory enables it at load."""
    from llamafactory.hparams import ModelArguments
    from llamafactory.model.model_utils.checkpointing import prepare_model_for_training
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    prepare_model_for_training(model, ModelArguments(model_name_or_path=str(model_dir)))
    return model


def begin_training(callback, model) -> str:
    """The callback's on_train_begin as the Trainer calls it on rank 0; what it printed to stderr. (Not capsys: its
    stream is closed after the test, and LLaMA-Factory's log handler, made on first use, would keep writing there.)"""
    from transformers import TrainerState

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        callback.on_train_begin(None, TrainerState(), None, model=model)
    return err.getvalue()


def loss_and_grads(model):
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(100, 5000, (2, 24), generator=generator)
    model.zero_grad()
    out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=input_ids)
    out.loss.backward()
    return out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_only_the_first_k_layers_recompute_in_backward(tiny_model_dir):
    model = checkpointed_model(tiny_model_dir)
    model.train()
    layers = model.model.language_model.layers
    assert checkpoint_layers.language_model_layers(model) == list(layers)
    assert all(layer.gradient_checkpointing for layer in layers)  # LLaMA-Factory checkpoints every layer
    full_loss, full_grads = loss_and_grads(model)

    callback = checkpoint_layers.callback(1)
    printed = begin_training(callback, model)
    assert [layer.gradient_checkpointing for layer in layers] == [True] + [False] * (len(layers) - 1)
    assert all(block.gradient_checkpointing for block in model.model.visual.blocks)  # the vision tower as it was
    line = "gradient checkpointing in 1 of 2 language-model layers (0)"
    assert callback.line == line and printed == f"mire_factory.train: {line}\n"

    calls = [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda module, args, output, i=i: calls.__setitem__(i, calls[i] + 1))
    loss, grads = loss_and_grads(model)
    assert calls == [2] + [1] * (len(layers) - 1)  # layer 0: forward, then its recompute in backward
    # the same loss and gradients as with every layer checkpointed
    assert loss == pytest.approx(full_loss, rel=1e-6) and grads.keys() == full_grads.keys()
    for name, grad in full_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)

    printed = begin_training(checkpoint_layers.callback(0), model)  # K=0: no language-model layer recomputes
    assert printed == "mire_factory.train: gradient checkpointing in 0 of 2 language-model layers (none)\n"
    calls[:] = [0] * len(layers)
    loss_and_grads(model)
    assert calls == [1] * len(layers)


def test_the_callback_refuses_a_model_it_cannot_apply_to(tiny_model_dir):
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with pytest.raises(MireInputError, match="gradient checkpointing is not on"):
        checkpoint_layers.apply(model, 1, "c.yaml")
    model.gradient_checkpointing_enable()
    with pytest.raises(MireInputError, match="field 'mire_checkpoint_layers': 3 is more than the language model's 2"):
        checkpoint_layers.apply(model, 3, "c.yaml")
    with pytest.raises(MireInputError, match="no language-model decoder layers found in Linear"):
        checkpoint_layers.apply(torch.nn.Linear(2, 2), 0)


def train_losses(model_dir, data_dir, out, *extra) -> tuple[list[tuple[float, float]], str]:
    """(loss, grad_norm) of each of three real optimizer steps of `python -m mire_factory.train` (in-process, gradient
    checkpointing on as LLaMA-Factory's default), and its stderr."""
    from mire_factory import train

    proc = call_main(train.main, "configs/qwen2_vl_2b_full_sft.yaml", f"model_name_or_path={model_dir}",
                     f"dataset_dir={data_dir}", f"output_dir={out}", "bf16=false", "eval_strategy='no'",
                     "image_max_pixels=12544", "preprocessing_num_workers=1", "dataloader_num_workers=0",
                     "max_steps=3", "per_device_train_batch_size=2", "gradient_accumulation_steps=1",
                     "logging_steps=1", "warmup_ratio=0", "save_strategy='no'", "plot_loss=false",
                     "learning_rate=1e-3", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [(e["loss"], e["grad_norm"]) for e in logged if "grad_norm" in e], proc.stderr


def test_a_training_with_it_logs_its_line_and_the_same_losses(tiny_model_dir, tiny_train_data, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    every, every_err = train_losses(tiny_model_dir, tiny_train_data, tmp_path / "every")
    first, first_err = train_losses(tiny_model_dir, tiny_train_data, tmp_path / "first", "mire_checkpoint_layers=1")
    assert "language-model layers" not in every_err
    assert first_err.count("mire_factory.train: gradient checkpointing in 1 of 2 language-model layers (0)\n") == 1
    assert len(first) == 3 and len({loss for loss, _ in first}) > 1  # the weights did change between steps
    for (loss_every, norm_every), (loss_first, norm_first) in zip(every, first, strict=True):
        assert loss_first == pytest.approx(loss_every, abs=1e-5) and norm_first == pytest.approx(norm_every, rel=1e-5)


@pytest.mark.parametrize("override, expected", [
    ("mire_checkpoint_layers=3", "field 'mire_checkpoint_layers': 3 is more than the language model's 2 layers"),
    ("mire_checkpoint_layers=-1", "field 'mire_checkpoint_layers': must be an integer >= 0 (the language-model "
                                  "layers that recompute in backward), got -1"),
    ("mire_checkpoint_layers=1.5", "must be an integer >= 0"),
    ("mire_checkpoint_layers=all", "must be an integer >= 0"),
    ("mire_checkpoint_layers=true", "must be an integer >= 0"),
    ("disable_gradient_checkpointing=true", "field 'mire_checkpoint_layers': needs gradient checkpointing, which "
                                            "disable_gradient_checkpointing=true turns off"),
])
def test_bad_values_are_refused_in_one_line(override, expected, tiny_model_dir, tiny_train_data, tmp_path,
                                            monkeypatch):
    from mire_factory import train

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    key = [] if override.startswith("mire_checkpoint_layers") else ["mire_checkpoint_layers=1"]
    proc = call_main(train.main, "configs/qwen2_vl_2b_full_sft.yaml", f"model_name_or_path={tiny_model_dir}",
                     f"dataset_dir={tiny_train_data}", f"output_dir={tmp_path}", override, *key)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0]
    assert lines[0].startswith("error: configs/qwen2_vl_2b_full_sft.yaml: field 'mire_checkpoint_layers': ")


def test_a_value_as_text_is_read_as_its_integer(tiny_model_dir):
    args = {"mire_checkpoint_layers": "2", "model_name_or_path": str(tiny_model_dir)}
    assert checkpoint_layers.read_key(args, "c.yaml") == 2 and "mire_checkpoint_layers" not in args
    assert checkpoint_layers.read_key({}, "c.yaml") is None
