"""Every shipped config goes through LLaMA-Factory's own argument parsing, and the recipes' numbers hold on the real
sample: no config asks for more than 100 new tokens, and cutoff_len never cuts image tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import REPO

CONFIGS = REPO / "configs"
TRAIN_RECIPES = ("qwen2_vl_full_sft", "qwen2_vl_2b_full_sft", "qwen2_vl_7b_1gpu_full_sft", "qwen2_vl_lora_sft",
                 "qwen2_vl_freeze_sft")
ALL_YAML = (*TRAIN_RECIPES, "predict")
# (image_max_pixels, cutoff_len): the freeze recipe keeps the community solution's 900000 pixels it cites
SIZING = {name: (589824, 10240) for name in ALL_YAML} | {"qwen2_vl_freeze_sft": (900000, 16384)}


def load_yaml(name: str) -> dict:
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text(encoding="utf-8"))


def parse(name: str, tmp_path: Path, **overrides):
    """LLaMA-Factory's get_train_args on the YAML. On this CPU-only machine: use_cpu (else transformers refuses
    bf16) and no deepspeed (not installed here; checked separately below)."""
    from llamafactory.hparams import get_train_args

    cfg = load_yaml(name)
    cfg.update({"use_cpu": True, "deepspeed": None, "output_dir": str(tmp_path / name), **overrides})
    return get_train_args(cfg)


@pytest.mark.parametrize("name", ALL_YAML)
def test_config_parses_with_llamafactory(name, tmp_path):
    model_args, data_args, training_args, finetuning_args, generating_args = parse(name, tmp_path)
    assert model_args.model_name_or_path
    assert data_args.template == "qwen2_vl"
    assert data_args.dataset_dir == "data/mire"
    assert training_args.bf16 and not training_args.fp16
    assert (model_args.image_max_pixels, data_args.cutoff_len) == SIZING[name]
    assert generating_args.max_new_tokens <= 100


@pytest.mark.parametrize("name", TRAIN_RECIPES)
def test_train_recipes_train_and_evaluate(name, tmp_path):
    _, data_args, training_args, finetuning_args, _ = parse(name, tmp_path)
    assert training_args.do_train and training_args.do_eval
    assert data_args.dataset == ["mire_train"] and data_args.eval_dataset == ["mire_val"]
    assert training_args.eval_strategy == "steps" and training_args.eval_steps
    assert training_args.save_steps and finetuning_args.plot_loss
    assert finetuning_args.freeze_vision_tower
    expected = {"qwen2_vl_full_sft": "full", "qwen2_vl_2b_full_sft": "full", "qwen2_vl_7b_1gpu_full_sft": "full",
                "qwen2_vl_lora_sft": "lora", "qwen2_vl_freeze_sft": "freeze"}[name]
    assert finetuning_args.finetuning_type == expected
    if name == "qwen2_vl_freeze_sft":
        assert finetuning_args.freeze_trainable_layers > 0  # the LAST n layers train
    model_name = load_yaml(name)["model_name_or_path"]
    assert model_name == ("Qwen/Qwen2-VL-2B-Instruct" if "2b" in name else "Qwen/Qwen2-VL-7B-Instruct")


def test_the_freeze_recipe_has_the_settings_of_the_result_it_cites(tmp_path):
    """The community solution behind "F1 84.9": the last 25 layers, lr 5e-6, 12 samples per step, 900000 pixels."""
    model_args, _, training_args, finetuning_args, _ = parse("qwen2_vl_freeze_sft", tmp_path)
    text = (CONFIGS / "qwen2_vl_freeze_sft.yaml").read_text(encoding="utf-8")
    assert "84.9" in text
    assert finetuning_args.finetuning_type == "freeze" and finetuning_args.freeze_trainable_layers == 25
    assert training_args.learning_rate == 5e-6
    assert training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps == 12
    assert model_args.image_max_pixels == 900000


@pytest.fixture(scope="module")
def sample_lengths(mire_sample):
    """image_max_pixels -> recipe_sizing.measure of the real sample at that budget, each measured once (it renders
    every record through LLaMA-Factory's mm_plugin, full-size screenshots included)."""
    from mire_factory.recipe_sizing import measure
    from mire_factory.records import load_records

    records = load_records(mire_sample / "train_sample.json", mire_sample / "images", kind="train")
    measured: dict[int, list] = {}

    def lengths(budget: int) -> list:
        if budget not in measured:
            measured[budget] = measure(records, mire_sample / "images", budget)
        return measured[budget]

    return lengths


def test_recipe_comments_state_the_measured_lengths(sample_lengths):
    """The sizing comments say what the data shows: training records have at most 4 images (3470 tokens at 589824
    pixels); the 11-image dialogues are the test set's."""
    lengths = sample_lengths(589824)
    longest = max(lengths, key=lambda x: x.total_tokens)
    text = (CONFIGS / "qwen2_vl_full_sft.yaml").read_text(encoding="utf-8")
    assert f"the longest training record is {longest.total_tokens} tokens ({longest.n_images} images" in text
    assert "at most 4 images per" in text and "The 11-image dialogues are in the test" in text
    assert "full train set has dialogues with up to 11" not in text


def test_2b_recipe_is_the_7b_recipe_sized_for_one_gpu():
    """One recipe, two sizes: the 2B file differs from the 7B one only in model, output dir, DeepSpeed and the split
    of the same 8 samples per optimizer step into micro-batches."""
    full, small = load_yaml("qwen2_vl_full_sft"), load_yaml("qwen2_vl_2b_full_sft")
    differing = {key for key in full.keys() | small.keys() if full.get(key) != small.get(key)}
    assert differing == {"model_name_or_path", "output_dir", "deepspeed", "per_device_train_batch_size",
                         "gradient_accumulation_steps"}
    assert "deepspeed" not in small
    assert (small["per_device_train_batch_size"] * small["gradient_accumulation_steps"]
            == full["per_device_train_batch_size"] * full["gradient_accumulation_steps"] == 8)


def test_7b_one_gpu_recipe_is_the_7b_recipe_without_deepspeed_and_with_8bit_adam_states(tmp_path):
    """The one-GPU 7B file differs from the ZeRO-3 one only in DeepSpeed, the optimizer and the output dir; LLaMA-Factory
    and transformers read its optimizer as torchao's 8-bit AdamW over fp32 master weights (bf16 autocast, not
    pure_bf16: LLaMA-Factory then upcasts the trained parameters to fp32)."""
    from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS, _get_torchao_optimizer
    from transformers.training_args import OptimizerNames

    full, one = load_yaml("qwen2_vl_full_sft"), load_yaml("qwen2_vl_7b_1gpu_full_sft")
    differing = {key for key in full.keys() | one.keys() if full.get(key) != one.get(key)}
    assert differing == {"deepspeed", "optim", "output_dir"}
    assert "deepspeed" not in one
    _, _, training_args, finetuning_args, _ = parse("qwen2_vl_7b_1gpu_full_sft", tmp_path)
    assert training_args.optim == OptimizerNames.ADAMW_TORCH_8BIT
    assert _OPTIMIZER_HANDLERS[training_args.optim] is _get_torchao_optimizer
    assert training_args.bf16 and not finetuning_args.pure_bf16 and training_args.deepspeed is None


def test_predict_is_greedy_and_within_the_rules(tmp_path):
    _, data_args, training_args, _, generating_args = parse("predict", tmp_path)
    assert training_args.do_predict and training_args.predict_with_generate and not training_args.do_train
    assert generating_args.do_sample is False
    assert 0 < generating_args.max_new_tokens <= 100
    assert data_args.eval_dataset == ["mire_test"]
    assert "deepspeed" not in load_yaml("predict")  # LLaMA-Factory refuses predict_with_generate under ZeRO-3


def test_no_config_asks_for_more_than_100_new_tokens():
    for path in CONFIGS.glob("*.yaml"):
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert cfg.get("max_new_tokens", 0) <= 100, path


@pytest.mark.parametrize("name,stage,offload", [
    ("qwen2_vl_full_sft", 3, False), ("qwen2_vl_freeze_sft", 2, False),
])
def test_deepspeed_configs(name, stage, offload):
    """deepspeed is not installed on CPU: the JSON is read by accelerate's HfDeepSpeedConfig (the class the HF
    Trainer builds on); its 'auto' values are those the Trainer fills from the training arguments."""
    from accelerate.utils.deepspeed import HfDeepSpeedConfig

    ds_path = REPO / load_yaml(name)["deepspeed"]
    raw = json.loads(ds_path.read_text())
    ds = HfDeepSpeedConfig(raw)
    assert ds.get_value("zero_optimization.stage") == stage
    assert ds.is_offload() is offload
    assert ds.is_zero3() is (stage == 3)
    assert raw["bf16"]["enabled"] == "auto"  # follows the recipe's bf16: true
    autos = {k for k, v in raw.items() if v == "auto"}
    assert autos <= {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                     "gradient_clipping"}
    if stage == 3:
        assert raw["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_full_sft_keeps_zero3_on_the_gpus_and_the_baseline_offloads():
    """Measured (BENCHMARKS.md): 7B full SFT with CPU offload was killed on 128 GB hosts, whole (params and optimizer,
    the official baseline's config) or 70% of the optimizer; without offload it takes 121 GiB on one H200 and 66 GiB
    per GPU on two. So the recipe shards over GPUs and ds_zero3_offload.json stays the baseline's."""
    from accelerate.utils.deepspeed import HfDeepSpeedConfig

    recipe = HfDeepSpeedConfig(json.loads((REPO / load_yaml("qwen2_vl_full_sft")["deepspeed"]).read_text()))
    assert recipe.is_zero3() and not recipe.is_offload()
    baseline = HfDeepSpeedConfig(json.loads((CONFIGS / "ds_zero3_offload.json").read_text()))
    assert baseline.is_zero3() and baseline.is_offload()
    assert baseline.get_value("zero_optimization.offload_param.device") == "cpu"
    assert baseline.get_value("zero_optimization.offload_optimizer.device") == "cpu"


def test_dataset_info_mirrors_convert():
    from mire_factory.dataset_info import dataset_name
    from mire_factory.sharegpt import sharegpt_entry

    shipped = json.loads((CONFIGS / "dataset_info.json").read_text(encoding="utf-8"))
    expected = {dataset_name(s): sharegpt_entry(f"{dataset_name(s)}.json") for s in ("train", "val", "test")}
    assert shipped == expected


def test_cutoff_len_keeps_every_image_token_of_the_real_sample(sample_lengths):
    for name in ALL_YAML:
        cfg = load_yaml(name)
        lengths = sample_lengths(cfg["image_max_pixels"])
        longest = max(lengths, key=lambda x: x.total_tokens)
        assert longest.total_tokens <= cfg["cutoff_len"], (name, longest)
        assert max(x.n_images for x in lengths) == 4 and longest.image_tokens > 4 * 700  # the budget really applies
