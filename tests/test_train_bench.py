"""benchmarks/gpu/train_bench.py, the producer of every training figure in BENCHMARKS.md: a real LLaMA-Factory run of
the tiny model on CPU writes its figures, and writes them before run_sft saves the model (on the H200 a full disk
failed the 11-image 7B run's save and, with it, its figures). The LoRA recipe trains with torchao installed (the
[lowbit] and dev extras): peft 0.18.1 imports a class torchao 0.18.0 removed, and every LoRA run failed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, call_main


@pytest.mark.slow
@pytest.mark.parametrize("recipe, extra, flags", [("qwen2_vl_7b_1gpu_full_sft", [], []),
                                                  ("qwen2_vl_lora_sft", ["mire_right_pad_causal=true",
                                                                         "mire_label_logits_only=true"], []),
                                                  # the one-GPU 7B command's launcher settings, all together
                                                  ("qwen2_vl_2b_full_sft", ["neat_packing=true", "cutoff_len=2048",
                                                                           "mire_packed_varlen=true",
                                                                           "mire_checkpoint_layers=1",
                                                                           "mire_label_logits_only=true",
                                                                           "gradient_accumulation_steps=1",
                                                                           "mire_master_weights=true",
                                                                           "optim=adamw_torch_8bit",
                                                                           "mire_fp8_adam_states=true",
                                                                           "mire_fp32_embedding_states=true"],
                                                   ["--skip_save"])])
def test_figures_are_written_when_training_ends_before_the_model_is_saved(recipe, extra, flags, tiny_model_dir,
                                                                         tiny_train_data, tmp_path):
    assert importlib.util.find_spec("torchao") is not None  # the dev extra's: the setting LoRA once failed in
    out, run_dir = tmp_path / "bench.json", tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu/train_bench.py", "--label", "cpu", "--out", str(out), "--warmup_steps", "1",
         "--profile", *flags, f"configs/{recipe}.yaml", f"model_name_or_path={tiny_model_dir}",
         f"dataset_dir={tiny_train_data}", "eval_dataset=null", "eval_strategy='no'", "save_strategy='no'", "max_steps=3",
         "report_to=none", f"output_dir={run_dir}", "bf16=false", "optim=adamw_torch", "image_max_pixels=12544",
         "preprocessing_num_workers=1", "dataloader_num_workers=0", "gradient_accumulation_steps=2", "plot_loss=false", "per_device_train_batch_size=1", *extra],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "DISABLE_VERSION_CHECK": "1",
             "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["cuda_alloc_conf"] == "expandable_segments:True"  # recorded: it moves reserved memory
    assert result["label"] == "cpu" and result["device"] == "cpu"
    accumulation = 1 if "gradient_accumulation_steps=1" in extra else 2
    assert result["steps_timed"] == 2 and result["samples_per_step"] == accumulation  # 3 steps, 1 untimed; 1 x GA
    sps = result["samples_per_s"]
    assert 0 < sps["min"] <= sps["median"] <= sps["max"]
    # mire_right_pad_causal / mire_packed_varlen reach the model (through a LoRA wrapper too) and are recorded
    assert result["right_pad_causal"] is any(flag in extra for flag in ("mire_right_pad_causal=true",
                                                                        "mire_packed_varlen=true"))
    assert result["packed_varlen"] is ("mire_packed_varlen=true" in extra)
    assert result["label_logits_only"] is ("mire_label_logits_only=true" in extra)  # through LoRA's wrapper
    assert result["checkpoint_layers"] == ("gradient checkpointing in 1 of 2 language-model layers (0)"
                                           if "mire_checkpoint_layers=1" in extra else None)
    # --profile: the untimed warm-up step, its kernels by time beside the figures
    assert result["profiled_step"]["step"] == 0 and result["profiled_step"]["wall_s"] > 0
    profile = out.with_suffix(".profile.txt").read_text()
    assert profile.startswith("step 0: ") and "aten::" in profile
    # a packed run's 4D mask summed as a token count gave about -1e18; LLaMA-Factory pads each pack to cutoff_len:
    # its real tokens and records are counted off the mask, so records outnumber packs and tokens stay under
    # the packs' length
    assert result["tokens_per_s"] > 0
    if "neat_packing=true" in extra:
        assert result["tokens_counted"] == "real"
        assert 0 < result["tokens_per_sample"] < 2048
        assert result["records_per_s"] > result["samples_per_s"]["mean"]
        # mire_trim_padding, on with varlen: the packs ran without their padding to cutoff_len
        trimmed = result["trimmed_positions"]
        assert trimmed["given"] % 2048 == 0 and 0 < trimmed["run"] < trimmed["given"]
    else:
        assert result["tokens_counted"] == "non_padding" and 0 < result["tokens_per_sample"] < 2048
        assert result["records_per_s"] == pytest.approx(result["samples_per_s"]["mean"])
    # every timed step as [seconds, real tokens], whose sums are the figures'
    steps = result["steps"]
    assert len(steps) == 2 and all(t > 0 and n > 0 for t, n in steps)
    assert sum(n for _, n in steps) / sum(t for t, _ in steps) == pytest.approx(result["tokens_per_s"], rel=1e-3)
    assert result["alloc_retries"] is None and result["liger_layers"] is None  # no CUDA allocator, no Liger on a CPU
    if "mire_fp8_adam_states=true" in extra:  # torchao's AdamW8bit, which optim built, made its fp8 sibling
        assert result["optimizer"].startswith("optimizer torchao.optim.adam.AdamWFp8 (optim=adamw_torch_8bit,")
        assert "'OptimStateFp8': " in result["optimizer"]
    else:
        assert result["optimizer"].startswith("optimizer torch.optim.adamw.AdamW (optim=adamw_torch,")
    if "mire_fp32_embedding_states=true" in extra:  # the tiny model's tied embedding: fp32 states
        assert result["embedding_states"].startswith("Adam states: fp32 for 1 embedding weights (")
        assert "'Tensor(float32)': " in result["optimizer"]
    else:
        assert result["embedding_states"] is None
    if "mire_master_weights=true" in extra:  # bf16 in the model, the optimizer's parameters fp32
        assert result["master_weights"].startswith("master weights: ") and "in bf16 in the model" in result["master_weights"]
        assert "parameters {'float32': " in result["optimizer"]
    else:
        assert result["master_weights"] is None
    assert result["mfu"] is None  # no peak is known for a CPU
    saved = run_dir / ("adapter_model.safetensors" if "lora" in recipe else "model.safetensors")
    if "--skip_save" in flags:  # the figures, then an exit before run_sft's save
        assert not saved.exists() and proc.stdout.count("BENCH ") == 1
        return
    assert saved.exists()  # run_sft did save, after the figures were on disk
    assert out.stat().st_mtime_ns <= saved.stat().st_mtime_ns
    assert proc.stdout.count("BENCH ") == 1


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / "gpu" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("args, expected", [
    (["--out", "{tmp}/r.json", "configs/nope.yaml"], "error: configs/nope.yaml: config file not found"),
    (["--out", "{tmp}/r.json", "configs/qwen2_vl_2b_full_sft.yaml", "max_steps"],
     "error: configs/qwen2_vl_2b_full_sft.yaml: field 'max_steps': override must be key=value"),
    (["--out", "{tmp}/file/r.json", "configs/qwen2_vl_2b_full_sft.yaml"], "is a file, not a directory"),
    (["--out", "{tmp}/r.json", "configs/qwen2_vl_2b_full_sft.yaml", "mire_packed_varlen=2"],
     "field 'mire_packed_varlen': must be true or false, got 2"),
    (["--out", "{tmp}/r.json", "configs/qwen2_vl_2b_full_sft.yaml", "mire_checkpoint_layers=-2"],
     "field 'mire_checkpoint_layers': must be an integer >= 0"),
    (["--profile", "--warmup_steps", "0", "--out", "{tmp}/r.json", "configs/qwen2_vl_2b_full_sft.yaml"],
     "field '--profile': needs --warmup_steps >= 1"),
    # /proc takes no new file, root or not: the line names the --out asked for, not the hidden temp beside it
    (["--out", "/proc/mire-r.json", "configs/qwen2_vl_2b_full_sft.yaml"], "error: /proc/mire-r.json: cannot be written"),
])
def test_bad_input_is_one_line_exit_2_before_any_training(args, expected, tmp_path):
    (tmp_path / "file").write_text("x")
    proc = call_main(load_script("train_bench").main, *(a.format(tmp=tmp_path) for a in args))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "r.json").exists()


LEASE7 = REPO / "benchmarks" / "gpu" / "results" / "h200"


def test_training_table_gives_the_ratio_and_packed_runs_records_per_second(tmp_path):
    packed = json.loads((LEASE7 / "issue20_lease7" / "ours_7b_1gpu.json").read_text())
    # a packed run: 2 sequences a step of 4 records each, so its samples/s is a quarter of its records/s
    packed.update(label="packed", overrides=[*packed["overrides"], "neat_packing=true"], tokens_counted="all",
                  samples_per_s={k: v / 4 for k, v in packed["samples_per_s"].items()})
    (tmp_path / "packed.json").write_text(json.dumps(packed))
    proc = call_main(load_script("training_table").main, LEASE7 / "ours_7b_zero3.json",
                     LEASE7 / "issue20_lease7" / "ours_7b_1gpu.json", tmp_path / "packed.json",
                     "--baseline", "ours_7b_zero3")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in proc.stdout.splitlines()[2:]}
    assert rows["`ours_7b_zero3`"][5] == "1.00x"
    assert rows["`ours_7b_1gpu`"][1] == "2.90" and rows["`ours_7b_1gpu`"][5] == "1.51x"
    # the unpacked runs' mean tokens a record (1174.3 and 1174.3) turn the packed run's tokens/s into records/s
    assert rows["`packed` (packed)"][1] == "2.90" and rows["`packed` (packed)"][5] == "1.51x"
    assert rows["`packed` (packed)"][0].endswith("(0.72)")


def test_pack_stats_counts_the_records_and_real_tokens_of_llamafactorys_packs(tiny_model_dir, tiny_train_data, tmp_path):
    """pack_stats.py through LLaMA-Factory's own preprocessing: every training record lands in some pack, the packs
    have cutoff_len's length, and padding is not counted as tokens."""
    out = tmp_path / "stats.json"
    common = ["configs/qwen2_vl_2b_full_sft.yaml", f"model_name_or_path={tiny_model_dir}",
              f"dataset_dir={tiny_train_data}", "neat_packing=true", "image_max_pixels=12544",
              "preprocessing_num_workers=1", f"output_dir={tmp_path / 'run'}"]
    proc = call_main(load_script("pack_stats").main, "--out", out, *common, "cutoff_len=1024")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(out.read_text())
    train = json.loads((tiny_train_data / "mire_train.json").read_text())
    assert stats["dataset"] == "mire_train" and stats["records"] == len(train) and stats["pack_length"] == 1024
    assert stats["records_per_pack"]["max"] > 1  # short records share packs
    assert 0 < stats["real_tokens"] < stats["packs"] * 1024 and stats["fill"] == stats["real_tokens"] / (
        stats["packs"] * 1024)
    bad = call_main(load_script("pack_stats").main, *common, "dataset_dir=/nonexistent")
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and "dataset_info.json" in lines[0]


def test_training_table_counts_old_packed_runs_records_from_pack_statistics(tmp_path):
    """Packed results before 2026-12-04 counted the packs' padding as tokens: with pack_stats.py's figures for the
    run's pack length and dataset, records/s is packs/s x records a pack and tokens/s and MFU shrink by the fill."""
    packed = json.loads((LEASE7 / "issue20_lease7" / "ours_7b_1gpu.json").read_text())
    packed.update(label="old_packed", overrides=[*packed["overrides"], "neat_packing=true"], tokens_counted="all",
                  tokens_per_s=2048.0, tokens_per_sample=1024.0, mfu=0.2)  # 2 packs a second
    (tmp_path / "packed.json").write_text(json.dumps(packed))
    stats = {"dataset": "mire_train", "pack_length": 1024, "fill": 0.75, "records_per_pack": {"mean": 3.0},
             "real_tokens_per_pack": {"mean": 768.0}}
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    (tmp_path / "other.json").write_text(json.dumps({**stats, "dataset": "mire_long", "fill": 0.5}))
    proc = call_main(load_script("training_table").main, LEASE7 / "issue20_lease7" / "ours_7b_1gpu.json",
                     tmp_path / "packed.json", "--baseline", "ours_7b_1gpu", "--pack_stats", tmp_path / "other.json",
                     tmp_path / "stats.json")
    assert proc.returncode == 0, proc.stderr
    row = [c.strip() for c in proc.stdout.splitlines()[-1].split("|")[2:-1]]
    assert row[1:] == ["6.00", "1536", "91.1 GiB", "15.0%", f"{6.0 / 2.90:.2f}x"]  # the recipe's own mire_train
    # without them: tokens/s over the unpacked runs' tokens a record, the padding counted as records
    proc = call_main(load_script("training_table").main, LEASE7 / "issue20_lease7" / "ours_7b_1gpu.json",
                     tmp_path / "packed.json")
    assert proc.stdout.splitlines()[-1].split("|")[3].strip() == f"{2048 / 1174.34:.2f}"


@pytest.mark.parametrize("case, expected", [
    ("missing", "missing.json"), ("not_result", "field 'samples_per_s': missing"),
    ("baseline", "error: --baseline: no result is labelled 'nope'"),
])
def test_training_table_bad_input_is_one_line_exit_2(case, expected, tmp_path):
    (tmp_path / "not_result.json").write_text(json.dumps({"label": "x"}))
    args = {"missing": [tmp_path / "missing.json"], "not_result": [tmp_path / "not_result.json"],
            "baseline": [LEASE7 / "ours_7b_zero3.json", "--baseline", "nope"]}[case]
    proc = call_main(load_script("training_table").main, *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0] and "Traceback" not in proc.stderr
