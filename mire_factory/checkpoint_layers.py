"""Gradient checkpointing in the first K decoder layers of the language model only (`mire_checkpoint_layers=K`).

Why: full gradient checkpointing recomputes every layer's forward in backward (about 8N instead of 6N FLOPs a token
for N parameters), and without it a 7B step on a 10,240-token pack runs out of memory on one H200. Checkpointing
only some layers trades between the two: the layers not checkpointed keep their activations (memory) and skip the
recompute (time). Neither LLaMA-Factory (`disable_gradient_checkpointing`: every layer or none) nor transformers
(`gradient_checkpointing_enable`: every layer) has a setting for it, hence this module.

How (transformers 5.6, LLaMA-Factory 0.9.5): every decoder layer is a `GradientCheckpointingLayer`
(transformers/modeling_layers.py), which runs its forward through `_gradient_checkpointing_func` only when its own
`gradient_checkpointing` attribute is true and it is training. LLaMA-Factory's `gradient_checkpointing_enable`
(model_utils/checkpointing.py, at load) sets that attribute and its own checkpoint function on every such layer, the
vision tower's blocks included. `callback(K)` sets the attribute False on the language model's layers K.. when
training begins (after the Trainer's own `gradient_checkpointing_enable`, if any): they then run plainly and keep
their activations; layers 0..K-1 keep LLaMA-Factory's checkpointing (whose function runs a layer without trainable
parameters plainly, as before); the vision tower is left as it was. The math is unchanged (recomputation gives the
same values), only what backward stores and recomputes.
"""

from __future__ import annotations

import sys

import torch

from .io import MireInputError, problem

KEY = "mire_checkpoint_layers"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under DDP / DeepSpeed / FSDP (`.module`) and PEFT (`get_base_model`) wrappers."""
    while True:
        if isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def language_model_layers(model: torch.nn.Module) -> list[torch.nn.Module] | None:
    """The language model's decoder layers in order (Qwen2-VL in transformers 5: model.model.language_model.layers,
    which `get_decoder()` finds); None when the model has no such list of checkpointable layers."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    model = unwrap(model)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        return None
    # an FSDP(1)-wrapped layer holds the transformers layer, whose attribute the checkpointing reads
    inner = [getattr(layer, "_fsdp_wrapped_module", layer) for layer in layers]
    return inner if all(isinstance(layer, GradientCheckpointingLayer) for layer in inner) else None


def layer_count(model_name_or_path: str | None, trust_remote_code: bool = False) -> int | None:
    """The language model's number of layers from the model's config (None where it cannot be read)."""
    if not model_name_or_path:
        return None
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    except Exception:  # LLaMA-Factory reports an unloadable model itself; the callback checks again
        return None
    count = getattr(getattr(config, "text_config", None) or config, "num_hidden_layers", None)
    return count if isinstance(count, int) else None


def read_key(args: dict, config: str) -> int | None:
    """`mire_checkpoint_layers`, removed from the arguments LLaMA-Factory gets: None when unset, else K (an integer,
    0 to the language model's layers, with gradient checkpointing on); anything else refused in one line."""
    if KEY not in args:
        return None
    value = args.pop(KEY)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MireInputError(problem(config, None, KEY, f"must be an integer >= 0 (the language-model layers that "
                                                        f"recompute in backward), got {value!r}"))
    if str(args.get("disable_gradient_checkpointing", False)).lower() == "true":
        raise MireInputError(problem(config, None, KEY, "needs gradient checkpointing, which "
                                                        "disable_gradient_checkpointing=true turns off"))
    count = layer_count(args.get("model_name_or_path"), bool(args.get("trust_remote_code")))
    if count is not None and value > count:
        raise MireInputError(problem(config, None, KEY, f"{value} is more than the language model's {count} layers "
                                                        f"({args.get('model_name_or_path')})"))
    return value


def apply(model: torch.nn.Module, k: int, config: str = "") -> tuple[int, int]:
    """Gradient checkpointing off in the language model's layers k.. (k, the layer count); raises MireInputError (as
    a problem of `config`'s key) when there are no such layers, fewer than k, or checkpointing is not on in them."""

    def refuse(message: str) -> MireInputError:
        return MireInputError(problem(config, None, KEY, message) if config else f"{KEY}: {message}")

    layers = language_model_layers(model)
    if layers is None:
        raise refuse(f"no language-model decoder layers found in {type(unwrap(model)).__name__}")
    if k > len(layers):
        raise refuse(f"{k} is more than the language model's {len(layers)} layers")
    if not all(layer.gradient_checkpointing for layer in layers[:k]):
        raise refuse("gradient checkpointing is not on in the language model's layers (does the model support it?)")
    for layer in layers[k:]:
        layer.gradient_checkpointing = False
    return k, len(layers)


def describe(k: int, count: int) -> str:
    span = "none" if k == 0 else "0" if k == 1 else f"0-{k - 1}"
    return f"gradient checkpointing in {k} of {count} language-model layers ({span})"


def callback(k: int, config: str = ""):
    """A TrainerCallback that calls `apply(model, k, config)` when training begins (after LLaMA-Factory loaded the
    model and enabled checkpointing) and says so in one stderr line on rank 0; `line` keeps that line."""
    from transformers import TrainerCallback

    class MireCheckpointLayers(TrainerCallback):
        line: str | None = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.line = describe(*apply(model, k, config))
            if state.is_world_process_zero:
                print(f"mire_factory.train: {self.line}", file=sys.stderr, flush=True)

    return MireCheckpointLayers()
