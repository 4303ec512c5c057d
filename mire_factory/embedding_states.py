"""fp32 Adam states for the input and output embeddings under torchao's low-bit AdamW
(`mire_fp32_embedding_states=true`, with `optim: adamw_torch_8bit` or `adamw_torch_4bit`).

Why: torchao's AdamW8bit keeps each moment as one byte an element on a map scaled per 256-element block, and the
second moment's map holds zero. An element whose second moment rounds to zero while its first moment does not gets
the update lr * m / eps, thousands of times the learning rate, where Adam's own never exceeds about 3 lr. An
embedding row is a block's worth of elements that get a gradient only in the steps whose batch holds its token, and
an output row of a rare token gets a tiny one, so there this happens most. A real pretrained 0.5B model trained 30
steps at lr 1e-5 on real records (benchmarks/adam_state_training.py, BENCHMARKS.md, issue 20) had single embedding
elements moved by up to 1.9 (its largest weight is 0.25) and 15,141 embedding elements past Adam's bound; with this
switch none, and its next-token distributions stayed 56x closer (mean KL) to the fp32-state model's.
bitsandbytes' authors keep embeddings in 32-bit states for this reason, and transformers does so for bitsandbytes'
8-bit Adam (Trainer.create_optimizer registers a 32-bit override for each nn.Embedding); for torchao's optimizers
neither transformers nor torchao has an override.

How: torchao creates a parameter's states at its first step, unless the parameter already has states, which its
update then uses as they are (its step is written for any tensor). So when training begins (the Trainer has built
the optimizer and loaded a resumed checkpoint) the input and output embedding weights that have no states yet get
fp32 zeros, as torch's AdamW would make. The other weights keep the low-bit states. At 7B (two untied 545M-element
embeddings) this costs 6.5 GB more than 8-bit states, at 2B (one tied) 1.4 GB.
"""

from __future__ import annotations

import sys

import torch

from .io import MireInputError, problem

KEY = "mire_fp32_embedding_states"
OPTIMS = ("adamw_torch_8bit", "adamw_torch_4bit")  # transformers' names for torchao's AdamW8bit and AdamW4bit


def check(args: dict, config: str) -> None:
    """Refuse, in one line naming the key, a run whose optimizer is not one of torchao's low-bit AdamWs."""
    optim = str(args.get("optim", "adamw_torch"))
    if optim not in OPTIMS:
        raise MireInputError(problem(config, None, KEY, f"needs optim {' or '.join(OPTIMS)} (torchao's low-bit "
                                                        f"AdamW), got optim={optim}"))


def embedding_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trained input and output embedding weights of `model` (a tied pair once)."""
    weights = []
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        weight = getattr(module, "weight", None)
        if weight is not None and weight.requires_grad and all(weight is not w for w in weights):
            weights.append(weight)
    return weights


def keep_fp32(optimizer, weights: list[torch.nn.Parameter], config: str = "") -> str:
    """Give each of `weights` without states yet fp32 zero states in the (possibly accelerate-wrapped) torchao
    optimizer; returns a line saying what it did."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not type(inner).__module__.startswith("torchao.optim"):
        raise MireInputError(problem(config, None, KEY, f"needs torchao's AdamW8bit or AdamW4bit as the optimizer, "
                                                        f"got {type(inner).__module__}.{type(inner).__name__}"))
    groups = {id(p): group for group in inner.param_groups for p in group["params"]}
    kept = 0
    for weight in weights:
        group = groups.get(id(weight))
        if group is None:  # a model whose embeddings the optimizer does not update (its weights were replaced)
            raise MireInputError(problem(config, None, KEY, f"an embedding weight {tuple(weight.shape)} is not one "
                                                            "the optimizer updates"))
        state = inner.state[weight]
        if state:  # created earlier or loaded from a checkpoint: they keep the kind they were saved in
            kept += 1
            continue
        state["step"] = torch.tensor(0.0)  # where and as torchao keeps it
        for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group.get("amsgrad") else ()):
            state[key] = torch.zeros_like(weight, dtype=torch.float32, memory_format=torch.preserve_format)
    if not weights:
        return "Adam states: no embedding is trained (every state stays low-bit)"
    numel = sum(w.numel() for w in weights)
    return (f"Adam states: fp32 for {len(weights)} embedding weights ({numel / 1e6:,.1f}M parameters; "
            f"{len(weights) - kept} set now, {kept} already had states), {type(inner).__name__}'s elsewhere")


def callback(config: str = ""):
    """A TrainerCallback giving the embeddings fp32 states when training begins (one stderr line on rank 0). It must
    run before master weights' (train.py orders them), while the model still holds the weights the optimizer
    updates."""
    from transformers import TrainerCallback

    class MireFp32EmbeddingStates(TrainerCallback):
        line: str | None = None

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            from .checkpoint_layers import unwrap

            self.line = keep_fp32(optimizer, embedding_weights(unwrap(model)), config)
            if state.is_world_process_zero:
                print(f"mire_factory.train: {self.line}", file=sys.stderr, flush=True)

    return MireFp32EmbeddingStates()
