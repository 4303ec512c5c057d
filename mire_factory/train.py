"""`python -m mire_factory.train CONFIG.yaml [key=value ...]`: LLaMA-Factory training (its `run_exp`) with the
per-task F1 callback, so that every evaluation logs eval_f1, eval_f1_image, eval_f1_dialogue into trainer_state.json.

Arguments are read as `llamafactory-cli train` reads them (the YAML merged with key=value overrides through
OmegaConf), plus our own keys, removed before LLaMA-Factory sees them:
  mire_f1_max_new_tokens (default 100, at most 100), mire_f1_max_samples (default: the whole validation set);
  mire_cudnn_sdp (default false): keep PyTorch's cuDNN attention backend, which the launcher turns off (its backward
    gave NaN gradients from the first step on an H200, pytorch/pytorch#196678);
  mire_right_pad_causal (default false): the language model's attention without a mask for right-padded training
    batches, so SDPA runs its flash kernel (exact for every real token; attention.py says why);
  mire_packed_varlen (default false): the same, and neat_packing's packed records attended one by one (PyTorch's
    varlen flash kernel on CUDA) instead of through a dense block-diagonal mask;
  mire_trim_padding (default: mire_packed_varlen's value): packed batches (neat_packing) computed without the
    trailing padding LLaMA-Factory adds to every pack up to cutoff_len (exact: pack_padding.py says why);
  mire_label_logits_only (default false): in training, the output layer and the loss at the label positions only,
    not at every prompt position (exact: the same loss; label_logits.py says why);
  mire_master_weights (default false): the model computes from bf16 copies of the trained weights and the optimizer
    updates fp32 master weights, as DeepSpeed's bf16 mode does (no casts of fp32 weights at every use); one process,
    gradient_accumulation_steps 1, no DeepSpeed or pure_bf16 (master_weights.py says why);
  mire_liger_layers (default false): Liger's RMSNorm, SwiGLU, LayerNorm and M-RoPE kernels in the model's layers
    (Qwen2-VL, Qwen2.5-VL; a CUDA GPU), without Liger's cross entropy, so it goes with mire_label_logits_only
    (liger_layers.py says why);
  mire_fp8_adam_states (default false): with optim=adamw_torch_8bit, torchao's AdamW with fp8 states (AdamWFp8)
    in place of its 8-bit ones: the same size, cheaper to quantize, less precise on real gradients
    (fp8_adam_states.py);
  mire_fp32_embedding_states (default false): with optim=adamw_torch_8bit or adamw_torch_4bit, fp32 Adam states for
    the input and output embeddings, whose 8-bit second moments round to zero and give updates thousands of times the
    learning rate (embedding_states.py says why);
  mire_checkpoint_layers (default unset: LLaMA-Factory's checkpointing of every layer): an integer K, gradient
    checkpointing in the first K language-model decoder layers only, the others keeping their activations (less
    recompute, more memory; vision blocks as LLaMA-Factory sets them; checkpoint_layers.py says how);
  mire_nan_guard (default true): stop at the first logged non-finite grad_norm or loss, save no final model, and
    exit 4 with one line naming the step, the value and the likely fixes (nan_guard.py);
  mire_tokenize_only (default false): with tokenized_path, only tokenize the train and evaluation datasets (no
    model loaded, nothing trained) and save them there; runs given that tokenized_path then load them.
After the first optimizer step one line names the optimizer built, its Adam state types and the trained parameters'
dtypes (OptimizerReport: an `optim` such as adamw_torch_8bit is seen to take effect).
A resumed training (resume_from_checkpoint, or the last checkpoint in output_dir) starts from the checkpoint's
weights, and load_best_model_at_end loads the best checkpoint's: transformers 5.6's Trainer loads neither for
Qwen2-VL, whose checkpoints keep their original weight names (resume.py).
Plain `llamafactory-cli train` gets none of these protections.
Set `metric_for_best_model=eval_f1` to keep the best checkpoint by the official metric.
When training begins the arguments trained with are saved as OUTPUT_DIR/training_args.yaml (LLaMA-Board's name),
where tools.vllm_infer reads the settings inference must share (cutoff_len, image pixels, template, the data's prompt
variant), for the final model and for every checkpoint-N of the run.

Distributed launch follows llamafactory-cli: with FORCE_TORCHRUN=1 or several visible GPUs the launcher re-runs
itself under torchrun with NNODES, NODE_RANK, NPROC_PER_NODE, MASTER_ADDR, MASTER_PORT; or run
`torchrun --nproc_per_node N -m mire_factory.train CONFIG` directly.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from transformers import TrainerCallback

from . import (
    attention,
    checkpoint_layers,
    embedding_states,
    fp8_adam_states,
    label_logits,
    liger_layers,
    master_weights,
    pack_padding,
    resume,
)
from .cot import SECOND_TURN
from .dataset_info import COT_LAYOUT_KEY, DATASET_INFO, read_dataset_info
from .f1_callback import F1Callback
from .io import EXIT_DIVERGED, MireInputError, problem, run_cli, write_text_atomic
from .nan_guard import NanGuardCallback, TrainingDiverged
from .rules import MAX_NEW_TOKENS

logger = logging.getLogger(__name__)

OWN_KEYS = ("mire_f1_max_new_tokens", "mire_f1_max_samples", "mire_cudnn_sdp", "mire_nan_guard",
            "mire_tokenize_only", "mire_right_pad_causal", "mire_packed_varlen", "mire_label_logits_only",
            "mire_checkpoint_layers", "mire_trim_padding", master_weights.KEY)
F1_PLOT_KEYS = ("eval_f1", "eval_f1_image", "eval_f1_dialogue")


def read_config(config: str, overrides: list[str]) -> dict:
    """The YAML merged with key=value overrides, as LLaMA-Factory's read_args does it."""
    from omegaconf import OmegaConf

    path = Path(config)
    if not path.is_file():
        raise MireInputError(problem(config, None, None, "config file not found"))
    if path.suffix not in (".yaml", ".yml"):
        raise MireInputError(problem(config, None, None, "expected a .yaml or .yml config"))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise MireInputError([problem(config, None, o, "override must be key=value") for o in bad])
    merged = OmegaConf.merge(OmegaConf.load(path.absolute()), OmegaConf.from_cli(overrides))
    return OmegaConf.to_container(merged)


def make_callback(args: dict, config: str) -> F1Callback:
    max_new_tokens = int(args.pop("mire_f1_max_new_tokens", MAX_NEW_TOKENS))
    max_samples = args.pop("mire_f1_max_samples", None)
    if not 0 < max_new_tokens <= MAX_NEW_TOKENS:
        raise MireInputError(problem(config, None, "mire_f1_max_new_tokens",
                                     f"must be in 1..{MAX_NEW_TOKENS} (competition rule), got {max_new_tokens}"))
    return F1Callback(max_new_tokens=max_new_tokens, max_samples=int(max_samples) if max_samples else None)


def check_layouts(args: dict, config: str) -> None:
    """mask_history trains the last turn only: on rows of tools.merge_cot --layout second_turn that is the reason,
    never the label the model must answer. Refused, naming the dataset."""
    dataset_dir = args.get("dataset_dir")
    if not args.get("mask_history") or not dataset_dir or not (Path(dataset_dir) / DATASET_INFO).is_file():
        return
    info = read_dataset_info(dataset_dir)
    value = args.get("dataset")
    names = [str(n) for n in value] if isinstance(value, list) else str(value or "").split(",")
    for name in (n.strip() for n in names):
        if isinstance(info.get(name), dict) and info[name].get(COT_LAYOUT_KEY) == SECOND_TURN:
            raise MireInputError(problem(config, None, "mask_history", f"LLaMA-Factory then trains the last turn only: "
                                         f"the reason of {name} (tools.merge_cot --layout {SECOND_TURN}), never its "
                                         "label; leave mask_history off"))


def own_flag(args: dict, key: str, default: bool, config: str) -> bool:
    """A true/false key of ours, removed from the arguments LLaMA-Factory gets."""
    value = args.pop(key, default)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if not isinstance(value, bool):
        raise MireInputError(problem(config, None, key, f"must be true or false, got {value!r}"))
    return value


def set_cudnn_sdp(enabled: bool) -> None:
    """PyTorch's cuDNN backend of scaled_dot_product_attention, on or off for this process (every rank runs it).

    Off by default: on the lent H200 (torch 2.11.0+cu130, transformers 5.6.0, LLaMA-Factory 0.9.5) full SFT of a
    Qwen2-VL (Qwen2.5-0.5B language model, bf16, configs/qwen2_vl_2b_full_sft.yaml) with the default sdpa attention
    had grad_norm NaN from the first optimizer step (batch 1 and 2 alike), then logged loss 0.0, and the model
    answered "!!!!!!"; eager attention (`flash_attn=disabled`) or `bf16=false` trained with finite gradients. This
    is pytorch/pytorch#196678: the cuDNN SDPA backward returns NaN grad_q on H100/H200 when seq_len % 128 == 64
    with an attention mask, the default backend since 2.11. Without it SDPA runs the flash or memory-efficient
    kernels, reported clean and as fast in that issue (training with this switch on the H200 is not measured here
    yet). The switch only affects CUDA tensors, so it is set on every machine (a CPU build accepts it and ignores
    it), and the training process carries the same state everywhere."""
    import torch

    torch.backends.cuda.enable_cudnn_sdp(enabled)
    if not enabled and torch.cuda.is_available():
        logger.warning("mire_factory.train: cuDNN SDPA backend disabled (NaN gradients on Hopper, "
                       "pytorch/pytorch#196678); mire_cudnn_sdp=true keeps it")


def tokenize_only(args: dict, config: str) -> None:
    """LLaMA-Factory's own preprocessing, as its sft workflow calls it (get_train_args, load_tokenizer,
    get_template_and_fix_tokenizer, get_dataset), on the arguments a training run with this YAML and these overrides
    parses: the same template, cutoff_len, image pixels, dataset/eval_dataset, dataset_dir and workers, so the saved
    data is exactly what that run would build. get_dataset saves it to tokenized_path (or loads it when it is
    there already); a run given that tokenized_path then loads it and ignores its other data arguments. Neither
    the model nor a trainer is built, so it costs the tokenization alone."""
    if not args.get("tokenized_path"):
        raise MireInputError(problem(config, None, "mire_tokenize_only",
                                     "needs tokenized_path (the folder the tokenized datasets are saved to)"))
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    model_args, data_args, training_args, finetuning_args, _ = get_train_args(args)
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    get_dataset(template, model_args, data_args, training_args, stage=finetuning_args.stage, **tokenizer_module)


class TrainingStarted(TrainerCallback):
    """Whether the Trainer got as far as its first step (errors before it are the configuration's); when it does,
    rank 0 saves the arguments trained with (save_training_args), so that the checkpoints of a run that is killed or
    still running carry them too (tools.vllm_infer reads a checkpoint's from its run's directory)."""

    def __init__(self, config_args: dict):
        self.started = False
        self.config_args = config_args

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = True
        if state.is_world_process_zero and self.config_args.get("output_dir"):
            save_training_args(self.config_args["output_dir"], self.config_args)


class OptimizerReport(TrainerCallback):
    """After the first optimizer step, one line (rank 0, stderr) naming the optimizer the Trainer built, the types of
    its Adam moment states and the dtypes of the parameters it updates: `optim: adamw_torch_8bit` must be seen to give
    torchao's AdamW8bit with 8-bit states (OptimState8bit; tensors under 4096 values stay fp32, as in bitsandbytes),
    `adamw_bnb_8bit` bitsandbytes' AdamW with uint8 states, and fp32 master weights must be seen to be fp32. `line`
    keeps it for benchmarks/gpu/train_bench.py."""

    def __init__(self):
        self.line: str | None = None

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if self.line is not None or optimizer is None:
            return
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
        states: Counter = Counter()
        for param_state in inner.state.values():
            for key in ("exp_avg", "exp_avg_sq", "state1", "state2"):  # torch/torchao, bitsandbytes
                value = param_state.get(key)
                if value is not None:
                    kind = type(value).__name__
                    states[f"{kind}({str(value.dtype).removeprefix('torch.')})" if kind == "Tensor" else kind] += 1
        params = Counter(str(p.dtype).removeprefix("torch.") for g in inner.param_groups for p in g["params"])
        cls, optim = type(inner), getattr(args.optim, "value", args.optim)  # an OptimizerNames member
        self.line = (f"optimizer {cls.__module__}.{cls.__qualname__} (optim={optim}, "
                     f"optim_args={args.optim_args or ''}); Adam states {dict(sorted(states.items()))}; "
                     f"parameters {dict(sorted(params.items()))}")
        if state.is_world_process_zero:
            print(f"mire_factory.train: {self.line}", file=sys.stderr, flush=True)


def needs_torchrun() -> bool:
    """As llamafactory-cli decides it, unless we already run under torchrun."""
    if "LOCAL_RANK" in os.environ:
        return False
    from llamafactory.extras.misc import get_device_count, is_env_enabled

    return is_env_enabled("FORCE_TORCHRUN") or get_device_count() > 1


def torchrun_command(argv: list[str]) -> list[str]:
    from llamafactory.extras.misc import find_available_port, get_device_count

    return [
        "torchrun",
        "--nnodes", os.getenv("NNODES", "1"),
        "--node_rank", os.getenv("NODE_RANK", "0"),
        "--nproc_per_node", os.getenv("NPROC_PER_NODE", str(max(1, get_device_count()))),
        "--master_addr", os.getenv("MASTER_ADDR", "127.0.0.1"),
        "--master_port", os.getenv("MASTER_PORT", str(find_available_port())),
        "-m", "mire_factory.train", *argv,
    ]


def plot_f1(output_dir: str) -> None:
    from llamafactory.extras.ploting import plot_loss

    if Path(output_dir, "trainer_state.json").is_file():
        plot_loss(output_dir, keys=list(F1_PLOT_KEYS))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    if needs_torchrun():
        return subprocess.run(torchrun_command(argv), check=False).returncode
    config, overrides = argv[0], argv[1:]
    args = read_config(config, overrides)
    # resume first: the weights a resumed run starts from are in place before any callback copies them (master_weights)
    callbacks = [make_callback(args, config), resume.callback()]
    check_layouts(args, config)
    set_cudnn_sdp(own_flag(args, "mire_cudnn_sdp", False, config))
    if own_flag(args, "mire_nan_guard", True, config):
        callbacks.append(NanGuardCallback())
    right_pad, packed = (own_flag(args, key, False, config) for key in ("mire_right_pad_causal", "mire_packed_varlen"))
    if right_pad or packed:
        callbacks.append(attention.callback(packed))
    if own_flag(args, "mire_trim_padding", packed, config):
        callbacks.append(pack_padding.callback())
    if own_flag(args, "mire_label_logits_only", False, config):
        key = liger_layers.liger_loss_key(args)
        if key:
            raise MireInputError(problem(config, None, "mire_label_logits_only", f"{key} already computes the "
                                         "training loss without the full logits; set only one of them (or "
                                         "mire_liger_layers=true: Liger's layer kernels alone)"))
        callbacks.append(label_logits.callback())
    if own_flag(args, liger_layers.KEY, False, config):
        liger_layers.check(args, config)
        callbacks.append(liger_layers.callback(config))
    if own_flag(args, fp8_adam_states.KEY, False, config):
        fp8_adam_states.check(args, config)
        callbacks.append(fp8_adam_states.callback(config))
    if own_flag(args, embedding_states.KEY, False, config):  # before master weights replace the trained weights
        embedding_states.check(args, config)
        callbacks.append(embedding_states.callback(config))
    checkpoint_k = checkpoint_layers.read_key(args, config)
    if checkpoint_k is not None:
        callbacks.append(checkpoint_layers.callback(checkpoint_k, config))
    if own_flag(args, master_weights.KEY, False, config):
        master_weights.check(args, config)
        callbacks.append(master_weights.callback(config))
    started = TrainingStarted(args)
    callbacks += [started, OptimizerReport()]
    from llamafactory.train.tuner import run_exp

    try:
        if own_flag(args, "mire_tokenize_only", False, config):
            tokenize_only(args, config)
            return 0
        run_exp(args=args, callbacks=callbacks)
    except ValueError as exc:
        # LLaMA-Factory's argument and data checks raise ValueError (an undefined dataset, a missing file, options
        # that do not go together): before the first step that is the user's configuration, said in one line. A
        # ValueError once training runs is a fault, and keeps its traceback.
        if started.started:
            raise
        raise MireInputError(problem(config, None, None, f"LLaMA-Factory refused it: {exc}")) from None
    except TrainingDiverged as exc:
        if int(os.getenv("RANK", "0")) == 0:  # every rank stops at the same step; one line says it
            sys.stdout.flush()  # the last line also where stdout and stderr go to one log (tools.kfold shows it)
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    if int(os.getenv("RANK", "0")) == 0 and args.get("output_dir") and args.get("plot_loss"):
        plot_f1(args["output_dir"])
    return 0


def save_training_args(output_dir: str, args: dict) -> Path:
    """The merged YAML and overrides, as LLaMA-Board saves them (extras/constants.py: TRAINING_ARGS)."""
    import yaml
    from llamafactory.extras.constants import TRAINING_ARGS

    path = Path(output_dir) / TRAINING_ARGS
    write_text_atomic(path, yaml.safe_dump(args, allow_unicode=True, sort_keys=False))
    return path


if __name__ == "__main__":
    run_cli(main)
