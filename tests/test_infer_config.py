"""tools.vllm_infer's settings come from the recipe (or the trained model's saved arguments): the values that must
equal training are read from one place, flags override them, and --help shows every default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_tool
from mire_factory.hparams import parse_args
from mire_factory.infer.args import InferArgs, config_values

CONFIGS = REPO / "configs"
YAMLS = sorted(p.name for p in CONFIGS.glob("*.yaml"))


def resolve(*argv) -> InferArgs:
    return parse_args(InferArgs, [str(a) for a in argv], config_values=config_values)


def lf_parse(name: str, tmp_path: Path):
    """LLaMA-Factory's own reading of the YAML (as test_configs does it on a CPU machine)."""
    from llamafactory.hparams import get_train_args

    cfg = yaml.safe_load((CONFIGS / name).read_text(encoding="utf-8"))
    cfg.update({"use_cpu": True, "deepspeed": None, "output_dir": str(tmp_path / "out")})
    return get_train_args(cfg)


@pytest.mark.parametrize("name", YAMLS)
def test_each_recipe_gives_inference_the_settings_training_uses(name, tmp_path):
    model_args, data_args, _, finetuning_args, generating_args = lf_parse(name, tmp_path)
    args = resolve("--config", CONFIGS / name, "--dataset", "mire_test")
    assert args.cutoff_len == data_args.cutoff_len
    assert args.image_max_pixels == model_args.image_max_pixels
    assert args.image_min_pixels == model_args.image_min_pixels
    assert args.template == data_args.template
    assert args.dataset_dir == data_args.dataset_dir
    assert args.max_new_tokens == generating_args.max_new_tokens <= 100
    raw = yaml.safe_load((CONFIGS / name).read_text(encoding="utf-8"))
    if raw.get("do_train"):  # the model a training recipe writes, not the one it starts from
        if finetuning_args.finetuning_type == "lora":
            assert (args.model_name_or_path, args.adapter_name_or_path) == (raw["model_name_or_path"],
                                                                            raw["output_dir"])
        else:
            assert args.model_name_or_path == raw["output_dir"] and args.adapter_name_or_path is None
    else:
        assert args.model_name_or_path == raw["model_name_or_path"] and args.dataset == "mire_test"


def test_defaults_are_the_recipes_and_flags_override_the_config():
    predict = yaml.safe_load((CONFIGS / "predict.yaml").read_text(encoding="utf-8"))
    bare = resolve("--model_name_or_path", "m", "--dataset", "mire_test", "--dataset_dir", "d")
    for key in ("cutoff_len", "image_max_pixels", "template", "max_new_tokens"):
        assert getattr(bare, key) == predict[key], key
    args = resolve("--config", CONFIGS / "predict.yaml", "--cutoff_len", "2048", "--dataset_dir", "elsewhere",
                   "--model_name_or_path=other")
    assert (args.cutoff_len, args.dataset_dir, args.model_name_or_path) == (2048, "elsewhere", "other")
    assert args.image_max_pixels == predict["image_max_pixels"] and args.dataset == predict["eval_dataset"]


def test_help_prints_every_default():
    import dataclasses

    proc = run_tool("vllm_infer", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for f in dataclasses.fields(InferArgs):
        assert f"--{f.name}" in text
        assert f"(default: {f.default})" in text, f.name
    assert "(default: 10240)" in text and "(default: 589824)" in text


def _registered(dataset_dir: Path, variants: dict[str, str]) -> None:
    from mire_factory.sharegpt import sharegpt_entry

    dataset_dir.mkdir(parents=True, exist_ok=True)
    info = {name: sharegpt_entry(f"{name}.json", variant) for name, variant in variants.items()}
    (dataset_dir / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    for name in variants:
        (dataset_dir / f"{name}.json").write_text("[]", encoding="utf-8")


def test_a_trained_model_directory_supplies_its_settings_and_prompt_variant(tmp_path):
    data = tmp_path / "data"
    _registered(data, {"mire_train_cot": "cot", "mire_test": "plain"})
    model = tmp_path / "saves"
    model.mkdir()
    recipe = yaml.safe_load((CONFIGS / "qwen2_vl_full_sft.yaml").read_text(encoding="utf-8"))
    recipe.update(dataset="mire_train_cot", dataset_dir=str(data), cutoff_len=4096, image_max_pixels=401408)
    (model / "training_args.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    for argv in (["--model_name_or_path", model], ["--config", model]):
        args = resolve(*argv, "--dataset", "mire_test")
        assert (args.model_name_or_path, args.cutoff_len, args.image_max_pixels) == (str(model), 4096, 401408)
        assert args.prompt_variant == "cot" and args.dataset_dir == str(data)
    # the test file was converted plain: the model would see prompts it was not trained on
    proc = run_tool("vllm_infer", "--model_name_or_path", model, "--dataset", "mire_test",
                    "--save_name", tmp_path / "p.jsonl")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "registered with prompt variant 'plain', but the model was trained with 'cot'" in errors[0]
    assert "--prompt_variant cot" in errors[0] and not (tmp_path / "p.jsonl").exists()


def test_a_checkpoint_of_a_run_is_read_with_its_runs_arguments(tmp_path):
    """A Trainer checkpoint (checkpoint-N) holds no training_args.yaml: its run's applies, and the model (or, for
    LoRA, the adapter) is the checkpoint."""
    data = tmp_path / "data"
    _registered(data, {"mire_train_cot": "cot", "mire_test": "cot"})
    run = tmp_path / "saves"
    (run / "checkpoint-200").mkdir(parents=True)
    recipe = yaml.safe_load((CONFIGS / "qwen2_vl_full_sft.yaml").read_text(encoding="utf-8"))
    recipe.update(dataset="mire_train_cot", dataset_dir=str(data), cutoff_len=4096, output_dir=str(run))
    (run / "training_args.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    checkpoint = run / "checkpoint-200"
    for argv in (["--model_name_or_path", checkpoint], ["--config", checkpoint]):
        args = resolve(*argv, "--dataset", "mire_test")
        assert (args.model_name_or_path, args.cutoff_len, args.prompt_variant) == (str(checkpoint), 4096, "cot")
    recipe.update(finetuning_type="lora", model_name_or_path="Qwen/Qwen2-VL-7B-Instruct")
    (run / "training_args.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    args = resolve("--config", checkpoint, "--dataset", "mire_test")
    assert (args.model_name_or_path, args.adapter_name_or_path) == ("Qwen/Qwen2-VL-7B-Instruct", str(checkpoint))
    (tmp_path / "other" / "checkpoint-7").mkdir(parents=True)  # no run arguments one level up either
    proc = run_tool("vllm_infer", "--config", tmp_path / "other" / "checkpoint-7", "--dataset", "mire_test",
                    "--dataset_dir", data)
    assert proc.returncode == 2 and "no training_args.yaml in this directory" in proc.stderr


def test_bad_configs_exit_2_in_one_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("cutoff_len: [1, 2]\n", encoding="utf-8")
    (tmp_path / "empty").mkdir()
    for config, message in ((tmp_path / "nope.yaml", "config file not found"),
                            (tmp_path / "bad.yaml", "field 'cutoff_len': expected an integer"),
                            (tmp_path / "empty", "no training_args.yaml in this directory")):
        proc = run_tool("vllm_infer", "--config", config, "--dataset", "mire_test", "--dataset_dir", tmp_path)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
