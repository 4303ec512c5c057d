"""A resumed training starts from its checkpoint's weights, and a best model loaded at the end is that model.

Why: transformers 5.6's Trainer loads a checkpoint's weights with `model.load_state_dict(state_dict, strict=False)`
(`_load_from_checkpoint`, and `_load_best_model` for load_best_model_at_end), while `save_pretrained` wrote them under
the checkpoint's original names (`revert_weight_conversion`): for Qwen2-VL `model.layers.*` and `visual.*`, where the
model's own are `model.language_model.layers.*` and `model.visual.*`. Not one name matches, nothing is loaded, and a
warning lists the missing keys: the resumed run goes on from the base model's weights with the checkpoint's
optimizer state, step and learning rate (huggingface/transformers#43701, open; QwenLM/Qwen3-VL#1763). On the tiny
model the resumed step logged the first step's loss (within 1e-7), tests/test_resume.py.
How: when training begins (the Trainer has loaded what it could, the optimizer state included) and when it ends
(after a best model was loaded), the checkpoint's weights are read again, their names mapped as `from_pretrained`
maps them (transformers' own conversion mapping for the model), and copied into the model; a checkpoint that lacks
any of the model's weights is refused in one line. A checkpoint whose names are the model's already (nothing to
map: the Trainer loaded it) is left as it is. DeepSpeed and FSDP load their own checkpoints and PEFT adapters are
loaded by PEFT: those are left alone too.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch

from .io import MireInputError, problem

logger = logging.getLogger(__name__)

SAFE_WEIGHTS, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"


def weight_files(checkpoint: Path) -> list[Path]:
    """The safetensors files of a checkpoint's model weights (one file, or the shards its index names); [] when it
    has none (an adapter, a DeepSpeed or FSDP checkpoint, or .bin weights)."""
    if (checkpoint / SAFE_WEIGHTS).is_file():
        return [checkpoint / SAFE_WEIGHTS]
    if (checkpoint / SAFE_INDEX).is_file():
        index = json.loads((checkpoint / SAFE_INDEX).read_text(encoding="utf-8"))
        return [checkpoint / name for name in sorted(set(index["weight_map"].values()))]
    return []


def saved_names(files: list[Path]) -> list[str]:
    from safetensors import safe_open

    names = []
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            names.extend(f.keys())
    return names


def load_weights(model: torch.nn.Module, checkpoint: Path) -> int | None:
    """The checkpoint's weights copied into `model` under the model's names; the number of tensors copied, or None
    when the names are the model's already or the checkpoint has no full-model weights. Raises MireInputError when
    some of the model's weights are not in the checkpoint."""
    from safetensors.torch import load_file
    from transformers.conversion_mapping import get_model_conversion_mapping

    # transformers' own renaming of a checkpoint's state dict to the model's names (the one its DeepSpeed loading
    # uses; from_pretrained applies the same mapping while it loads): private, pinned with transformers 5.6
    from transformers.integrations.deepspeed import _apply_weight_conversions_to_state_dict

    files = weight_files(checkpoint)
    if not files:
        return None
    own = model.state_dict()
    if set(saved_names(files)) <= own.keys():
        return None
    state_dict = {}
    for path in files:
        state_dict.update(load_file(str(path)))
    converted = _apply_weight_conversions_to_state_dict(model, state_dict, get_model_conversion_mapping(model))
    loaded_storages = {own[name].data_ptr() for name in converted if name in own}
    # a tied weight (the 2B's lm_head and embeddings) is saved once, under one of its names
    missing = [name for name in own if name not in converted and own[name].data_ptr() not in loaded_storages]
    if missing:
        raise MireInputError(problem(str(checkpoint), None, None, f"{len(missing)} of the model's weights are not "
                                     f"in the checkpoint (first: {missing[0]}); was it saved from this model?"))
    with torch.no_grad():
        model.load_state_dict(converted, strict=False)  # what it leaves out is tied to a loaded weight (above)
    return len(converted)


def applies(args, model) -> bool:
    return not (args.deepspeed or getattr(args, "fsdp", None) or hasattr(model, "peft_config")
                or hasattr(model, "get_base_model"))


def callback():
    """A TrainerCallback: the resumed checkpoint's weights loaded under the model's names when training begins, and
    the best model's when it ends with load_best_model_at_end; one stderr line on rank 0 each time it loads."""
    from transformers import TrainerCallback
    from transformers.trainer_utils import get_last_checkpoint

    from .checkpoint_layers import unwrap

    class MireResumeWeights(TrainerCallback):
        def __init__(self):
            self.lines: list[str] = []  # what was loaded, as said on stderr

        def load(self, model, checkpoint: str, state, what: str) -> None:
            count = load_weights(unwrap(model), Path(checkpoint))
            if count is not None:
                line = f"{what}: {count} weights loaded from {checkpoint} under the model's names"
                self.lines.append(line)
                if state.is_world_process_zero:
                    print(f"mire_factory.train: {line}", file=sys.stderr, flush=True)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            checkpoint = args.resume_from_checkpoint
            if checkpoint is True or str(checkpoint).lower() == "true":
                checkpoint = get_last_checkpoint(args.output_dir)
            if checkpoint and Path(str(checkpoint)).is_dir() and applies(args, model):
                self.load(model, str(checkpoint), state, "resumed")

        def on_train_end(self, args, state, control, model=None, **kwargs):
            if args.load_best_model_at_end and state.best_model_checkpoint and applies(args, model):
                self.load(model, state.best_model_checkpoint, state, "best model")

    return MireResumeWeights()
