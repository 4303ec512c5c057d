"""mire_factory/resume.py: a resumed training starts from its checkpoint's weights and load_best_model_at_end ends
with the best checkpoint's, where transformers 5.6's Trainer alone loads neither for Qwen2-VL (its checkpoints keep
the original weight names)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import call_main
from mire_factory import resume
from mire_factory.io import MireInputError

# every step one batch of all 6 training records: the losses depend on the weights alone, not on the data order
COMMON = ("bf16=false", "eval_strategy='no'", "image_max_pixels=12544", "preprocessing_num_workers=1",
          "dataloader_num_workers=0", "per_device_train_batch_size=6", "gradient_accumulation_steps=1",
          "logging_steps=1", "warmup_ratio=0", "plot_loss=false", "learning_rate=1e-3", "report_to=none",
          "max_steps=3", "save_strategy=steps", "save_steps=2", "save_only_model=false")


def losses(out) -> list[float]:
    return [e["loss"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]


def launch(model_dir, data_dir, out, *extra):
    from mire_factory import train

    proc = call_main(train.main, "configs/qwen2_vl_2b_full_sft.yaml", f"model_name_or_path={model_dir}",
                     f"dataset_dir={data_dir}", f"output_dir={out}", *COMMON, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_a_resumed_training_goes_on_from_its_checkpoint(tiny_model_dir, tiny_train_data, tmp_path, monkeypatch):
    from llamafactory.train.tuner import run_exp

    from mire_factory.train import read_config

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    launch(tiny_model_dir, tiny_train_data, tmp_path / "whole")
    whole = losses(tmp_path / "whole")
    assert len(whole) == 3 and whole[2] < whole[0]
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    resumed_from = (f"resume_from_checkpoint={checkpoint}", "overwrite_output_dir=false")

    # LLaMA-Factory's run_exp alone (llamafactory-cli train): the resumed step 3 is step 1 again (the base weights)
    args = read_config("configs/qwen2_vl_2b_full_sft.yaml", [f"model_name_or_path={tiny_model_dir}",
                       f"dataset_dir={tiny_train_data}", f"output_dir={tmp_path / 'upstream'}", *COMMON,
                       *resumed_from])
    run_exp(args=args)
    assert losses(tmp_path / "upstream")[2] == pytest.approx(whole[0], rel=1e-6) != whole[2]

    # README's way: the same command with overwrite_output_dir=false, LLaMA-Factory then resumes from the last
    # checkpoint in output_dir (a run killed after its step-2 checkpoint)
    shutil.copytree(checkpoint, tmp_path / "killed" / "checkpoint-2")
    proc = launch(tiny_model_dir, tiny_train_data, tmp_path / "killed", "overwrite_output_dir=false")
    assert losses(tmp_path / "killed")[2] == pytest.approx(whole[2], rel=1e-6)
    assert proc.stderr.count("mire_factory.train: resumed: ") == 1
    assert f"weights loaded from {tmp_path / 'killed' / 'checkpoint-2'} under the model's names" in proc.stderr


@pytest.mark.slow
def test_load_best_model_at_end_ends_with_the_best_checkpoints_weights(tiny_model_dir, tiny_train_data, tmp_path,
                                                                        monkeypatch):
    """Evaluated and saved every step, the best by the highest eval_loss: the saved model is that checkpoint's."""
    from safetensors.torch import load_file

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    out = tmp_path / "out"
    proc = launch(tiny_model_dir, tiny_train_data, out, "eval_strategy=steps", "eval_steps=1", "save_steps=1",
                  "load_best_model_at_end=true", "metric_for_best_model=eval_loss", "greater_is_better=true",
                  "mire_f1_max_new_tokens=2", "per_device_eval_batch_size=4")
    best = json.loads((out / "trainer_state.json").read_text())["best_model_checkpoint"]
    assert best and not best.endswith("checkpoint-3")  # not the last step's: the test tells the two apart
    assert proc.stderr.count("mire_factory.train: best model: ") == 1
    saved, expected, last = (load_file(str(folder / "model.safetensors"))
                             for folder in (out, tmp_path / best, out / "checkpoint-3"))
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in saved)
    assert any(not torch.equal(saved[k], last[k]) for k in saved)


def test_load_weights_maps_the_saved_names_and_refuses_a_checkpoint_without_the_models_weights(tiny_model_dir,
                                                                                              tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.save_pretrained(tmp_path / "saved")
    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    assert not saved.keys() & model.state_dict().keys()  # the original names (model.layers.*, visual.*)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert resume.load_weights(model, tmp_path / "saved") == len(saved)
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())

    (tmp_path / "own").mkdir()  # the model's names already: the Trainer loads those itself
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
              str(tmp_path / "own" / "model.safetensors"))
    assert resume.load_weights(model, tmp_path / "own") is None
    assert resume.load_weights(model, tmp_path) is None  # no model weights (an adapter, a DeepSpeed checkpoint)

    (tmp_path / "part").mkdir()
    save_file({k: v for k, v in saved.items() if not k.startswith("visual.")},
              str(tmp_path / "part" / "model.safetensors"))
    with pytest.raises(MireInputError) as info:
        resume.load_weights(model, tmp_path / "part")
    assert info.value.lines[0].startswith(f"{tmp_path / 'part'}: ")
    assert "of the model's weights are not in the checkpoint (first: model.visual." in info.value.lines[0]
