"""CPU smoke runs of the real llamafactory-cli on the shipped recipes (tiny model, converted real sample):
full SFT trains on every record of the train split and saves; predict.yaml writes one prediction line per test
record."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

LF_CLI = str(Path(sys.executable).parent / "llamafactory-cli")
# CPU-sized overrides only: model path, data, no deepspeed/bf16, a few steps, small images
CPU = ["deepspeed=null", "bf16=false", "image_max_pixels=12544", "preprocessing_num_workers=1",
       "dataloader_num_workers=0", "report_to=none"]


def lf(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([LF_CLI, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, f"llamafactory-cli {args[:2]} exited {proc.returncode}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def converted_sample(mire_sample, tmp_path_factory):
    """The real sample through tools.convert's code: train/val split, and a test-format copy (no labels)."""
    from mire_factory.convert import convert
    from mire_factory.io import read_json, write_json_atomic

    root = tmp_path_factory.mktemp("converted_sample")
    images = mire_sample / "images"
    convert(mire_sample / "train_sample.json", images, root / "train", val_size=0.25, seed=0)
    unlabelled = [{k: v for k, v in r.items() if k != "output"} for r in read_json(mire_sample / "train_sample.json")]
    write_json_atomic(root / "test.json", unlabelled)
    convert(root / "test.json", images, root / "test")
    return root


@pytest.fixture(scope="module")
def trained_run(converted_sample, tiny_model_dir, tmp_path_factory):
    """The full SFT recipe trained for 2 steps: (output dir, llamafactory-cli's output)."""
    out = tmp_path_factory.mktemp("full_sft") / "out"
    # eval_strategy quoted: OmegaConf (LLaMA-Factory's override parser) reads a bare `no` as False
    proc = lf("train", "configs/qwen2_vl_full_sft.yaml", f"model_name_or_path={tiny_model_dir}",
              f"dataset_dir={converted_sample / 'train'}", f"output_dir={out}", *CPU,
              "max_steps=2", "gradient_accumulation_steps=1", "eval_strategy='no'", "save_steps=2", "logging_steps=1")
    return out, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def trained(trained_run):
    return trained_run[0]


@pytest.mark.slow
def test_full_sft_recipe_trains_and_saves(trained_run, converted_sample):
    trained, log = trained_run
    # every converted real record reached training: LLaMA-Factory's pipeline dropped none
    n_train, n_val = (len(json.loads((converted_sample / "train" / f"{split}.json").read_text(encoding="utf-8")))
                      for split in ("mire_train", "mire_val"))
    assert n_train + n_val == 24 and f"Num examples = {n_train}" in log.replace(",", "")
    results = json.loads((trained / "train_results.json").read_text())
    assert math.isfinite(results["train_loss"]) and results["train_loss"] > 0
    state = json.loads((trained / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2]
    assert (trained / "model.safetensors").is_file() and (trained / "config.json").is_file()
    assert (trained / "checkpoint-2").is_dir()
    assert (trained / "training_loss.png").is_file()  # plot_loss: true in the recipe


@pytest.mark.slow
def test_predict_recipe_writes_one_line_per_record(trained, converted_sample, tmp_path):
    out = tmp_path / "predict"
    lf("train", "configs/predict.yaml", f"model_name_or_path={trained}",
       f"dataset_dir={converted_sample / 'test'}", f"output_dir={out}", *CPU,
       "max_new_tokens=4", "per_device_eval_batch_size=8")
    lines = (out / "generated_predictions.jsonl").read_text(encoding="utf-8").splitlines()
    n_test = len(json.loads((converted_sample / "test" / "mire_test.json").read_text(encoding="utf-8")))
    assert n_test == 24 and len(lines) == n_test
    rows = [json.loads(line) for line in lines]
    assert all({"prompt", "predict", "label"} <= row.keys() for row in rows)
    assert all(row["label"].strip() == "" for row in rows)  # test records: empty assistant turn
