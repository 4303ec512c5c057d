"""tools.vllm_infer's arguments: one dataclass for flags and --config, with the recipes' settings as defaults.

The settings that must equal training (cutoff_len, image pixel limits, template, prompt variant) come from one of:
- `--config configs/predict.yaml` (a predict YAML: its model, eval_dataset and settings);
- `--config configs/qwen2_vl_full_sft.yaml` (a training YAML: the model it writes, output_dir, with its settings;
  the prompt variant of the dataset it trains on);
- `--config saves/.../sft` (a trained model's directory: the training_args.yaml that mire_factory.train and
  LLaMA-Board save there; a `checkpoint-N` inside it is read with its run's); a --model_name_or_path directory
  holding one (or a checkpoint-N of such a run) is read the same way without --config.
Flags given on the command line override the config. Without any, the defaults are the recipes' values.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..dataset_info import DATASET_INFO, PROMPT_VARIANT_KEY, entry_caps, format_caps, read_dataset_info
from ..hparams import read_yaml
from ..io import MireInputError, problem
from ..prompt_variants import PROMPT_VARIANTS
from ..rules import MAX_NEW_TOKENS, MAX_PARAMETERS
from .backends import BACKENDS

TRAINING_ARGS = "training_args.yaml"  # LLaMA-Factory's name (extras/constants.py), written by mire_factory.train
CHECKPOINT_DIR = re.compile(r"checkpoint-\d+")  # transformers' PREFIX_CHECKPOINT_DIR and the step

# The recipes' values (configs/*.yaml): a test keeps them equal.
RECIPE_CUTOFF_LEN = 10240
RECIPE_IMAGE_MAX_PIXELS = 589824
LF_IMAGE_MIN_PIXELS = 32 * 32  # LLaMA-Factory's default; no recipe sets it


@dataclass
class InferArgs:
    model_name_or_path: str | None = field(default=None, metadata={"help": "model directory or hub name"})
    dataset: str | None = field(default=None, metadata={"help": "name registered in DATASET_DIR/dataset_info.json "
                                                                "(from a predict YAML: its eval_dataset)"})
    dataset_dir: str | None = field(default=None, metadata={"help": "folder of dataset_info.json (tools.convert's "
                                                                    "--output_dir)"})
    config: str | None = field(default=None, metadata={
        "help": "settings to infer with, as trained: a predict or training YAML of configs/, or a trained model's "
                "directory (its training_args.yaml); flags override it"})
    adapter_name_or_path: str | None = field(default=None, metadata={"help": "LoRA adapter directory"})
    template: str = field(default="qwen2_vl", metadata={"help": "LLaMA-Factory chat template"})
    prompt_variant: str | None = field(default=None, metadata={
        "help": "the prompt variant the model was trained with (from --config: its training data's registration); "
                "must equal the dataset's. Default: the dataset's registered variant. Choices: "
                + ", ".join(PROMPT_VARIANTS)})
    task_image_max_pixels: str | None = field(default=None, metadata={
        "help": "the per-task pixel caps the model's training data was converted with (tools.convert "
                "--scene_image_max_pixels / --dialogue_image_max_pixels), as 'image=P,dialogue=P' or 'none'; from "
                "--config: its training data's registration; must equal the dataset's. Default: the dataset's"})
    backend: str | None = field(default=None, metadata={
        "help": "generation backend (infer/backends.py); default: hf, measured faster than vllm on an H200 "
                "(BENCHMARKS.md, vLLM)",
        "choices": list(BACKENDS)})
    save_name: str = field(default="generated_predictions.jsonl", metadata={
        "help": "predictions JSONL; PATH.meta.json beside it records what made them"})
    cutoff_len: int = field(default=RECIPE_CUTOFF_LEN, metadata={
        "help": "prompt token budget, as in training; longer dialogues lose their earliest turns"})
    max_new_tokens: int = field(default=MAX_NEW_TOKENS, metadata={
        "help": f"answer token budget (competition: at most {MAX_NEW_TOKENS})"})
    image_max_pixels: int = field(default=RECIPE_IMAGE_MAX_PIXELS, metadata={
        "help": "images are shrunk to at most this many pixels, as in training"})
    image_min_pixels: int = field(default=LF_IMAGE_MIN_PIXELS, metadata={
        "help": "images are enlarged to at least this many pixels, as in training"})
    max_images_per_prompt: int | None = field(default=None, metadata={"help": "drop the earliest images beyond this"})
    batch_size: int = field(default=32, metadata={"help": "hf backend: prompts per generate call"})
    compile: bool = field(default=False, metadata={
        "help": "hf backend on CUDA: varlen attention and torch.compile in the vision tower, a compiled decode step "
                "(CUDA graphs); ~1.5 min of compiling first"})
    vllm_engine_args: str | None = field(default=None, metadata={
        "help": "vllm backend: JSON object of extra vLLM engine arguments, e.g. "
                "'{\"max_num_seqs\": 512, \"gpu_memory_utilization\": 0.5}'"})
    vllm_renderer_workers: int = field(default=8, metadata={
        "help": "vllm backend: threads running vLLM's multimodal processor"})
    vllm_max_in_flight: int = field(default=512, metadata={"help": "vllm backend: requests handed over at once"})
    image_workers: int = field(default=8, metadata={
        "help": "vllm backend: threads decoding and resizing images before vLLM gets them"})
    cot_reason_chars: int | None = field(default=None, metadata={
        "help": "vllm backend, --constrained with a CoT prompt variant: longest reason (default: the most that "
                "always leaves room for the label within --max_new_tokens)"})
    constrained: bool = field(default=False, metadata={
        "help": "decode only valid answers of the record's task, in the prompt variant's answer format"})
    num_shards: int = field(default=1, metadata={"help": "split the dataset into this many contiguous shards"})
    shard_index: int = field(default=0, metadata={"help": "the shard this run predicts"})
    merge_shards: bool = field(default=False, metadata={"help": "merge the shard files of --save_name, then exit"})
    tensor_parallel_size: int = field(default=1, metadata={"help": "vllm backend: GPUs per model"})
    overwrite: bool = field(default=False, metadata={
        "help": "start afresh when --save_name holds predictions (a resume must come from the same model and "
                "settings, else it is refused)"})
    retry_failed: bool = field(default=False, metadata={
        "help": "predict again the rows that failed (field `error`, e.g. an undecodable image)"})
    no_competition_limits: bool = field(default=False, metadata={
        "help": f"allow --max_new_tokens above {MAX_NEW_TOKENS} and a model of {MAX_PARAMETERS / 1e9:.0f}B "
                "parameters or more (mire_factory/rules.py)"})


def _first_name(value: Any) -> list[str]:
    if isinstance(value, list):
        return [str(v).strip() for v in value]
    return [v.strip() for v in str(value).split(",") if v.strip()] if value else []


def variant_of(dataset_dir: str | os.PathLike, names: list[str]) -> str | None:
    """The prompt variant shared by the registrations of `names` in dataset_dir; None when unknown (no such folder or
    registration) or when they differ."""
    if not names or not (Path(dataset_dir) / DATASET_INFO).is_file():
        return None
    info = read_dataset_info(dataset_dir)
    found = {info[n].get(PROMPT_VARIANT_KEY, "plain") for n in names if isinstance(info.get(n), dict)}
    return found.pop() if len(found) == 1 and len(names) == len([n for n in names if n in info]) else None


def caps_of(dataset_dir: str | os.PathLike, names: list[str]) -> str | None:
    """The per-task pixel caps (format_caps) shared by the registrations of `names` in dataset_dir; None when unknown
    or when they differ."""
    if not names or not (Path(dataset_dir) / DATASET_INFO).is_file():
        return None
    info = read_dataset_info(dataset_dir)
    if not all(isinstance(info.get(n), dict) for n in names):
        return None
    found = {format_caps(entry_caps(info[n], Path(dataset_dir) / DATASET_INFO, n)) for n in names}
    return found.pop() if len(found) == 1 else None


def settings_from_yaml(data: dict, source: str, model_dir: str | None = None) -> dict[str, Any]:
    """InferArgs values from a LLaMA-Factory YAML (predict or training) or a trained model's saved arguments."""
    out: dict[str, Any] = {}
    for key in ("template", "cutoff_len", "image_max_pixels", "image_min_pixels", "dataset_dir", "max_new_tokens"):
        if data.get(key) is not None:
            out[key] = data[key]
    lora = data.get("finetuning_type") == "lora"
    trained = model_dir or (data.get("output_dir") if data.get("do_train") else None)
    if trained:  # a training run: infer with what it writes
        if lora:
            out["model_name_or_path"] = data.get("model_name_or_path")
            out["adapter_name_or_path"] = trained
        else:
            out["model_name_or_path"] = trained
        train_sets = _first_name(data.get("dataset"))
    else:  # a predict YAML
        out["model_name_or_path"] = data.get("model_name_or_path")
        if data.get("adapter_name_or_path"):
            out["adapter_name_or_path"] = data["adapter_name_or_path"]
        evals = _first_name(data.get("eval_dataset"))
        if evals:
            out["dataset"] = evals[0]
        train_sets = evals
    if data.get("dataset_dir"):
        variant = variant_of(data["dataset_dir"], train_sets)
        if variant:
            out["prompt_variant"] = variant
        caps = caps_of(data["dataset_dir"], train_sets)
        if caps:
            out["task_image_max_pixels"] = caps
    for key in ("cutoff_len", "image_max_pixels", "image_min_pixels", "max_new_tokens"):
        if key in out and not isinstance(out[key], int):
            raise MireInputError(problem(source, None, key, f"expected an integer, got {out[key]!r}"))
    return {k: v for k, v in out.items() if v is not None}


def saved_arguments(model_dir: str | os.PathLike) -> Path:
    """Where a trained model directory's arguments are: its own training_args.yaml, or for a Trainer checkpoint
    (checkpoint-N, which holds none) its run's, one level up."""
    path = Path(model_dir)
    if not (path / TRAINING_ARGS).is_file() and CHECKPOINT_DIR.fullmatch(path.name):
        return path.parent / TRAINING_ARGS
    return path / TRAINING_ARGS


def config_values(config: str | None, given: dict[str, Any]) -> dict[str, Any]:
    """hparams.parse_args' hook: field values from --config, or from the saved arguments of a model directory."""
    if config is None:
        model = given.get("model_name_or_path")
        if model and saved_arguments(model).is_file():
            config = model
        else:
            return {}
    path = Path(config)
    if path.is_dir():
        saved = saved_arguments(path)
        if not saved.is_file():
            raise MireInputError(problem(path, None, None, f"no {TRAINING_ARGS} in this directory (mire_factory.train "
                                                           "and LLaMA-Board save one; or give the training YAML)"))
        values = settings_from_yaml(read_yaml(saved), str(saved), model_dir=str(path))
        print(f"settings from {saved}: " + ", ".join(f"{k}={v}" for k, v in sorted(values.items())))
        return values
    return settings_from_yaml(read_yaml(path), str(path))


def resolve_infer_args(**given: Any) -> InferArgs:
    """InferArgs as tools.vllm_infer makes them from these flags' values: over the settings of `config` (or of the
    model directory's saved arguments), as the command line overrides them."""
    return InferArgs(**{**config_values(given.get("config"), given), **given})
