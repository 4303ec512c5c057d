"""python -m mire_factory.train: LLaMA-Factory's run_exp with the per-task F1 callback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from conftest import REPO
from mire_factory.f1_callback import f1_metrics, shard_indices, split_prompt


def test_split_prompt_takes_the_unsupervised_prefix():
    assert split_prompt([1, 2, 3, 4, 5], [-100, -100, -100, 4, 5]) == ([1, 2, 3], [4, 5])
    assert split_prompt([1, 2], [-100, -100]) is None  # cutoff_len left no answer
    # a second exchange (merge_cot --layout second_turn): the answer is the first assistant turn only
    assert split_prompt([1, 2, 3, 4, 5, 6, 7], [-100, 2, 3, -100, -100, 6, 7]) == ([1], [2, 3])


@pytest.mark.parametrize("n,world", [(7, 2), (5, 4), (1, 3), (8, 8)])
def test_shards_are_equal_length_and_cover_everything_once(n, world):
    shards = [shard_indices(list(range(n)), rank, world) for rank in range(world)]
    assert len({len(indices) for indices, _ in shards}) == 1  # same number of generate calls on every rank (ZeRO-3)
    real = [i for indices, n_real in shards for i in indices[:n_real]]
    assert sorted(real) == list(range(n))


def test_f1_metrics_are_the_official_scoring_after_fixing():
    from mire_factory.scoring import score

    golds = ["商品头图", "退款页面", "是否好用", "气泡"]
    preds = ['{"理由": "首页大图", "所属类别": "商品头图"}', "退款页", "是否好用。", "发货数量"]
    new, rows = f1_metrics(golds, preds)
    assert [r["predict"] for r in rows] == ["商品头图", "退款页面", "是否好用", "发货数量"]
    expected = score(golds, [r["predict"] for r in rows], ["image", "image", "dialogue", "dialogue"])
    assert new["eval_f1_image"] == round(expected["image"]["f1"], 4) == 1.0
    assert new["eval_f1_dialogue"] == round(expected["dialogue"]["f1"], 4)
    assert new["eval_f1"] == round((expected["image"]["f1"] + expected["dialogue"]["f1"]) / 2, 4)


def test_f1_metrics_read_answers_as_cal_acc_does():
    """The callback and tools.cal_acc read answers with the same module: an empty or unmatched answer is invalid
    (not a guessed default label), a CoT answer is parsed against a CoT gold."""
    from mire_factory.answers import INVALID
    from mire_factory.scoring import score

    golds = ['{"理由": "", "所属类别": "商品头图"}', "退款页面", "是否好用", "气泡"]
    preds = ['{"理由": "首页大图", "所属类别": "商品头图"}', "", "完全看不懂", "气泡"]
    new, rows = f1_metrics(golds, preds)
    assert [r["predict"] for r in rows] == ["商品头图", None, None, "气泡"]
    assert [r["how"] for r in rows] == ["exact", "empty", "unmatched", "exact"]
    expected = score(["商品头图", "退款页面", "是否好用", "气泡"], ["商品头图", INVALID, INVALID, "气泡"],
                     ["image", "image", "dialogue", "dialogue"])
    assert new["eval_f1"] == round(expected["overall"]["f1"], 4)


def test_the_final_evaluation_of_the_last_evaluated_step_reuses_its_answers(monkeypatch, tmp_path):
    """LLaMA-Factory evaluates once more after training; at the step just evaluated, with the same weights (no best
    checkpoint loaded), the callback logs the same F1 without generating again. Any other evaluation generates."""
    from types import SimpleNamespace

    from mire_factory.f1_callback import F1Callback

    callback, calls = F1Callback(), []

    def evaluate_f1(args, model, collator, dataset, prefix, is_main):
        calls.append(prefix)
        return {f"{prefix}_f1": 0.5 + len(calls) / 10}, [{"index": 0, "predict": str(len(calls))}]

    monkeypatch.setattr(callback, "evaluate_f1", evaluate_f1)
    loader = SimpleNamespace(collate_fn=SimpleNamespace(template=None, tokenizer=None), dataset=[0, 1, 2])

    def evaluate(step, best_at_end=False, prefix="eval"):
        args = SimpleNamespace(load_best_model_at_end=best_at_end, output_dir=str(tmp_path))
        state = SimpleNamespace(global_step=step, epoch=1.0, is_world_process_zero=True,
                                log_history=[{"step": step, f"{prefix}_loss": 1.0}])
        metrics = {f"{prefix}_runtime": 1.0}
        callback.on_evaluate(args, state, None, metrics=metrics, model=object(), eval_dataloader=loader)
        return metrics[f"{prefix}_f1"], state.log_history[-1][f"{prefix}_f1"]

    assert evaluate(2) == (0.6, 0.6) and evaluate(2) == (0.6, 0.6) and len(calls) == 1  # trainer.evaluate() at the end
    assert evaluate(4) == (0.7, 0.7) and len(calls) == 2  # a new step
    assert evaluate(4, prefix="eval_other") == (0.8, 0.8) and len(calls) == 3  # another eval set
    assert evaluate(4, prefix="eval_other", best_at_end=True) == (0.9, 0.9) and len(calls) == 4  # best model loaded
    rows = [json.loads(line) for line in (tmp_path / "f1_eval" / "eval_step2.jsonl").read_text().splitlines()]
    assert rows == [{"index": 0, "predict": "1"}]


def test_launcher_refuses_more_than_100_new_tokens(capsys, monkeypatch):
    from mire_factory import train
    from mire_factory.io import run_cli

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(SystemExit) as exit_info:  # `python -m mire_factory.train` is run_cli(main), in this process
        run_cli(train.main, ["configs/qwen2_vl_lora_sft.yaml", "mire_f1_max_new_tokens=128"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: configs/qwen2_vl_lora_sft.yaml: field 'mire_f1_max_new_tokens': must be in 1..100 (competition rule), "
        "got 128"]


def test_launcher_refuses_mask_history_on_second_turn_rows(capsys, monkeypatch, tmp_path):
    """mask_history would train the reason of a second_turn row and never its label."""
    from mire_factory import train
    from mire_factory.io import run_cli
    from mire_factory.sharegpt import sharegpt_entry

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    reason = {**sharegpt_entry("r.json", "plain"), "mire_cot_layout": "second_turn"}
    (tmp_path / "dataset_info.json").write_text(json.dumps({"mire_train": sharegpt_entry("t.json"), "r": reason}),
                                                encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train.main, ["configs/qwen2_vl_lora_sft.yaml", f"dataset_dir={tmp_path}", "dataset=mire_train,r",
                             "mask_history=true"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: configs/qwen2_vl_lora_sft.yaml: field 'mask_history': LLaMA-Factory then trains the last turn only: "
        "the reason of r (tools.merge_cot --layout second_turn), never its label; leave mask_history off"]
    for args in ({"mask_history": False, "dataset": "r"}, {"mask_history": True, "dataset": ["mire_train"]}):
        train.check_layouts({**args, "dataset_dir": str(tmp_path)}, "c.yaml")  # no second_turn rows under it


@pytest.mark.slow
def test_launcher_logs_per_task_f1_into_trainer_state(tiny_model_dir, tmp_path):
    from mire_factory.convert import convert
    from mire_factory.synthetic import DEFAULT_IMAGE_CLASSES, make_records, write_dataset
    from mire_factory.taxonomy import DIALOGUE_LABELS

    records = make_records(6, 6, tmp_path / "images", seed=3, image_classes=DEFAULT_IMAGE_CLASSES[:3],
                           dialogue_classes=DIALOGUE_LABELS[:3], max_dialogue_images=2)
    write_dataset(tmp_path / "train.json", records)
    result = convert(tmp_path / "train.json", tmp_path / "images", tmp_path / "data", val_size=0.5, seed=0)
    val_golds = Counter(r.output for r in result.splits["mire_val"])
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "mire_factory.train", "configs/qwen2_vl_full_sft.yaml",
         f"model_name_or_path={tiny_model_dir}", f"dataset_dir={tmp_path / 'data'}", f"output_dir={out}",
         "deepspeed=null", "bf16=false", "image_max_pixels=12544", "preprocessing_num_workers=1",
         "dataloader_num_workers=0", "max_steps=2", "gradient_accumulation_steps=1", "eval_steps=2", "save_steps=2",
         "logging_steps=1", "per_device_eval_batch_size=4", "mire_f1_max_new_tokens=8"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-4000:]

    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    evals = [e for e in history if "eval_f1" in e]
    assert evals and evals[-1]["step"] == 2
    for key in ("eval_f1", "eval_f1_image", "eval_f1_dialogue"):
        assert 0.0 <= evals[-1][key] <= 1.0
    assert evals[-1]["eval_f1"] == pytest.approx((evals[-1]["eval_f1_image"] + evals[-1]["eval_f1_dialogue"]) / 2,
                                                 abs=1e-3)
    assert "eval_loss" in evals[-1]  # merged into the trainer's own eval entry
    # LLaMA-Factory's evaluation after training (eval_results.json) has the step-2 F1, not generated a second time
    final = json.loads((out / "eval_results.json").read_text())
    keys = ("eval_f1", "eval_f1_image", "eval_f1_dialogue")
    assert {k: final[k] for k in keys} == {k: evals[-1][k] for k in keys}
    assert proc.stderr.count("F1 eval: generating:   0%") == 1, proc.stderr[-4000:]

    rows = [json.loads(line) for line in (out / "f1_eval" / "eval_step2.jsonl").read_text().splitlines()]
    assert Counter(r["gold"] for r in rows) == val_golds  # every validation record, gold read back from the labels
    assert {r["task"] for r in rows} == {"image", "dialogue"}
    assert (out / "training_eval_f1.png").is_file()

    # the arguments trained with are saved where tools.vllm_infer finds them (model dir, no --config needed)
    from mire_factory.hparams import parse_args
    from mire_factory.infer.args import InferArgs, config_values

    args = parse_args(InferArgs, ["--model_name_or_path", str(out), "--dataset", "mire_val"],
                      config_values=config_values)
    assert (args.model_name_or_path, args.image_max_pixels, args.cutoff_len) == (str(out), 12544, 10240)
    assert args.dataset_dir == str(tmp_path / "data") and args.prompt_variant == "plain"
