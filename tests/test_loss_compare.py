"""benchmarks/gpu/loss_compare.py: the same short training under two optimizer settings, real LLaMA-Factory runs of
the tiny model on CPU, losses per step side by side."""

from __future__ import annotations

import ast
import importlib.util
import json
import math

import pytest

from conftest import REPO, call_main

spec = importlib.util.spec_from_file_location("loss_compare", REPO / "benchmarks" / "gpu" / "loss_compare.py")
loss_compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(loss_compare)

STEPS = 3


def compare(tiny_model_dir, data_dir, out, *variants):
    return call_main(loss_compare.main, "--out", out, "--steps", STEPS, *(a for v in variants for a in ("--variant", v)),
                     "configs/qwen2_vl_2b_full_sft.yaml", f"model_name_or_path={tiny_model_dir}",
                     f"dataset_dir={data_dir}", "bf16=false", "image_max_pixels=12544", "preprocessing_num_workers=1",
                     "dataloader_num_workers=0", "per_device_train_batch_size=1", "gradient_accumulation_steps=1",
                     "learning_rate=1e-3", "warmup_ratio=0")


def check_result(out, names):
    result = json.loads((out / "loss_compare.json").read_text())
    assert result["reference"] == names[0] and list(result["runs"]) == names
    for name in names:
        run = result["runs"][name]
        assert run["rc"] == 0
        assert run["steps"] == list(range(1, STEPS + 1))  # one loss per optimizer step, every step
        assert len(run["loss"]) == STEPS and all(math.isfinite(x) for x in run["loss"])
        assert not list((out / name).glob("*.safetensors"))  # the final model is not kept
    diff = result["against_reference"][names[1]]
    for key in ("loss", "loss_smoothed10"):
        assert 0 <= diff[key]["mean_abs"] <= diff[key]["max_abs"] < math.inf
    assert (out / "loss_compare.png").stat().st_size > 0
    return result


@pytest.mark.slow
def test_two_optimizers_give_per_step_losses_and_their_difference(tiny_model_dir, tiny_train_data, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    out = tmp_path / "cmp"
    proc = compare(tiny_model_dir, tiny_train_data, out, "adamw=optim=adamw_torch", "adafactor=optim=adafactor")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = check_result(out, ["adamw", "adafactor"])
    runs = result["runs"]
    assert runs["adamw"]["optimizer"].startswith("optimizer torch.optim.adamw.AdamW (optim=adamw_torch,")
    assert "Adam states {'Tensor(float32)':" in runs["adamw"]["optimizer"]
    assert runs["adafactor"]["optimizer"].startswith("optimizer transformers.optimization.Adafactor (optim=adafactor")
    # the same first batch at the same weights: step 1's loss is the same; the updates then differ
    assert runs["adamw"]["loss"][0] == runs["adafactor"]["loss"][0]
    assert result["against_reference"]["adafactor"]["loss"]["max_abs"] > 0


@pytest.mark.slow
def test_the_8bit_adamws_are_what_optim_selects(tiny_model_dir, tiny_train_data, tmp_path, monkeypatch):
    """`optim: adamw_torch_8bit` (configs/qwen2_vl_7b_1gpu_full_sft.yaml) builds torchao's AdamW8bit with 8-bit
    states over fp32 parameters, and `optim: adamw_bnb_8bit` bitsandbytes' AdamW with uint8 states; both train
    (torchao and bitsandbytes come with the dev and lowbit extras), and so does AdamW8bit made fp8 by
    `mire_fp8_adam_states`, and AdamW8bit with fp32 embedding states (`mire_fp32_embedding_states`) under master
    weights (its states set before master weights replace the model's weights), and so with torchao's AdamW4bit."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    out = tmp_path / "cmp"
    proc = compare(tiny_model_dir, tiny_train_data, out, "fp32_states=optim=adamw_torch",
                   "ao8=optim=adamw_torch_8bit optim_args=bf16_stochastic_round=True", "bnb8=optim=adamw_bnb_8bit",
                   "fp8=optim=adamw_torch_8bit mire_fp8_adam_states=true",
                   "emb32=optim=adamw_torch_8bit mire_fp32_embedding_states=true mire_master_weights=true",
                   "ao4_emb32=optim=adamw_torch_4bit mire_fp32_embedding_states=true mire_master_weights=true")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = check_result(out, ["fp32_states", "ao8", "bnb8", "fp8", "emb32", "ao4_emb32"])["runs"]
    line = runs["ao8"]["optimizer"]
    assert line.startswith("optimizer torchao.optim.adam.AdamW8bit (optim=adamw_torch_8bit, "
                           "optim_args=bf16_stochastic_round=True)")
    assert "'OptimState8bit':" in line and "parameters {'float32':" in line
    line = runs["bnb8"]["optimizer"]
    assert line.startswith("optimizer bitsandbytes.optim.adamw.AdamW (optim=adamw_bnb_8bit, ")
    assert "'Tensor(uint8)':" in line and "parameters {'float32':" in line
    assert runs["bnb8"]["loss"][0] == runs["fp32_states"]["loss"][0]
    # mire_fp8_adam_states: the AdamW8bit that optim built, made torchao's AdamWFp8 before its first step
    line = runs["fp8"]["optimizer"]
    assert line.startswith("optimizer torchao.optim.adam.AdamWFp8 (optim=adamw_torch_8bit, ")
    assert "'OptimStateFp8':" in line and "OptimState8bit" not in line and "parameters {'float32':" in line
    assert runs["fp8"]["loss"][0] == runs["fp32_states"]["loss"][0]
    # the tiny model's one (tied) embedding: its two states fp32, the other large weights' 8-bit as before
    ao8, emb32 = (adam_states(runs[name]["optimizer"]) for name in ("ao8", "emb32"))
    assert emb32["OptimState8bit"] == ao8["OptimState8bit"] - 2
    assert emb32["Tensor(float32)"] == ao8["Tensor(float32)"] + 2
    assert "parameters {'float32':" in runs["emb32"]["optimizer"]  # the masters
    # optim=adamw_torch_4bit: torchao's AdamW4bit, the same two embedding states fp32
    assert runs["ao4_emb32"]["optimizer"].startswith("optimizer torchao.optim.adam.AdamW4bit (optim=adamw_torch_4bit,")
    assert adam_states(runs["ao4_emb32"]["optimizer"]) == {"OptimState4bit": emb32["OptimState8bit"],
                                                          "Tensor(float32)": emb32["Tensor(float32)"]}


def adam_states(line: str) -> dict:
    """OptimizerReport's Adam state counts: the dict after 'Adam states '."""
    return ast.literal_eval(line.split("Adam states ", 1)[1].split("; parameters", 1)[0])


def test_a_malformed_variant_is_one_line(tmp_path):
    proc = call_main(loss_compare.main, "--out", tmp_path, "--variant", "no equals sign", "configs/predict.yaml")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --variant: field 'no equals sign': expected NAME=OVERRIDES, NAME of letters, digits, '_', '-', '.' "
        "(OVERRIDES may be empty)"]
    assert not (tmp_path / "loss_compare.json").exists()


def test_the_optimizer_line_is_found_behind_a_progress_bar():
    """On the GPU machine tqdm's bar shares the line (the twelfth lease's loss_compare.json missed both lines)."""
    log = ("  0%|          | 0/100 [00:00<?, ?it/s]mire_factory.train: optimizer bitsandbytes.optim.adamw.AdamW "
           "(optim=adamw_bnb_8bit, optim_args=); Adam states {'Tensor(uint8)': 392}\n{'loss': '1.0'}\n")
    assert loss_compare.OPTIMIZER_LINE.search(log).group(1) == ("optimizer bitsandbytes.optim.adamw.AdamW "
                                                               "(optim=adamw_bnb_8bit, optim_args=); Adam states "
                                                               "{'Tensor(uint8)': 392}")


def _compare_file(path, runs, steps=3):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"steps": steps, "runs": {
        name: {"rc": 0, "steps": list(range(1, steps + 1)), "loss": loss} for name, loss in runs.items()}}))
    return path


def test_runs_from_separate_calls_are_compared_as_one(tmp_path):
    """A lent machine is released between calls: fp32 states and the 8-bit runs in one file, a later run in another."""
    first = _compare_file(tmp_path / "a" / "loss_compare.json", {"fp32": [3.0, 2.0, 1.0], "ao8": [3.0, 2.5, 1.0]})
    later = _compare_file(tmp_path / "b" / "loss_compare.json", {"master": [3.0, 2.0, 0.7]})
    proc = call_main(loss_compare.main, "--out", tmp_path / "merged", "--merge", first, later)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "merged" / "loss_compare.json").read_text())
    assert result["reference"] == "fp32" and list(result["runs"]) == ["fp32", "ao8", "master"]
    assert result["against_reference"]["ao8"]["loss"] == {"max_abs": 0.5, "mean_abs": pytest.approx(0.5 / 3)}
    assert result["against_reference"]["master"]["loss"]["max_abs"] == pytest.approx(0.3)
    assert (tmp_path / "merged" / "loss_compare.png").stat().st_size > 0
    assert "master vs fp32:" in proc.stdout


def test_a_merge_with_a_repeated_run_name_or_a_missing_file_is_one_line(tmp_path):
    first = _compare_file(tmp_path / "a.json", {"fp32": [1.0, 1.0, 1.0]})
    proc = call_main(loss_compare.main, "--out", tmp_path / "m", "--merge", first, first)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {first}: field 'runs': a run named 'fp32' is already in an earlier file"]
    proc = call_main(loss_compare.main, "--out", tmp_path / "m", "--merge", first, tmp_path / "nothing.json")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert f"{tmp_path / 'nothing.json'}: not a readable loss_compare.json" in proc.stderr
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"steps": 3, "runs": {"fp32": {"rc": 0, "loss": [1.0]}}}))
    proc = call_main(loss_compare.main, "--out", tmp_path / "m", "--merge", broken)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {broken}: field 'runs.fp32': expected 'steps' and 'loss' lists of one length"]
    assert not (tmp_path / "m" / "loss_compare.json").exists()
