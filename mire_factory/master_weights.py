"""bf16 weights in the model, fp32 master weights in the optimizer (`mire_master_weights=true`).

Why: with bf16 autocast and no DeepSpeed, LLaMA-Factory upcasts the trained parameters to fp32 (model/adapter.py), so
the model computes from fp32 weights: autocast casts every weight to bf16 at each use (forward, and again where
checkpointed layers recompute) and every weight gradient back to fp32, and the fp32 embedding and norm weights keep
the residual stream and its elementwise work in fp32. In a profiled 7B packed step on an H200 dtype copies took 0.11 s
and elementwise multiplies 0.12 s of 1.36 s (BENCHMARKS.md, issue 20). DeepSpeed's bf16 mode and Megatron keep
instead bf16 weights for compute and fp32 copies ("master weights") for the update; LLaMA-Factory has that only
under DeepSpeed, and `run_exp` takes no optimizer of ours (pure_bf16 drops the fp32 weights altogether).

How: when training begins (the Trainer has built its optimizer over the fp32 parameters and loaded a resumed
checkpoint), each trained fp32 parameter is replaced in its modules by a bf16 copy (tied parameters by one copy); the
optimizer keeps the fp32 tensors, now the masters. After backward and the Trainer's clipping, the bf16 gradients are
handed to the masters as fp32 (`on_pre_optimizer_step`); the optimizer updates the masters; the copies are then set
to the masters rounded to bf16 (`on_optimizer_step`). So every update is added to an fp32 weight, as before, and a
run of updates each below bf16's resolution still moves the weight.
What differs from fp32 weights under autocast: the model's own computation is bf16 where it was fp32 (the residual
stream, norm weights); the weight gradients come from bf16 matmuls either way (autocast casts them to fp32 after);
a clipped gradient is rounded to bf16 once more. Saving and loading see the masters: `state_dict()` gives the fp32
masters (a checkpoint and the final model are fp32, as without this), and `load_state_dict` (a best model loaded at
the end) sets the masters and the copies.
Limits, refused in one line: one optimizer step per micro-batch (gradient_accumulation_steps 1: summed over several
micro-batches in bf16 the gradient would lose what fp32 keeps; pack records with neat_packing to fill a step), one
process (DDP's reducer holds the parameters it was built with), no DeepSpeed or FSDP (their own master weights), not
with pure_bf16 (no fp32 weights to keep).
"""

from __future__ import annotations

import logging
import sys

import torch

from .io import MireInputError, problem

logger = logging.getLogger(__name__)

KEY = "mire_master_weights"
COMPUTE_DTYPE = torch.bfloat16


class MasterWeights:
    """The bf16 copies placed in `model` and the fp32 masters the optimizer updates (pairs in the same order)."""

    def __init__(self, model: torch.nn.Module):
        self.masters: list[torch.nn.Parameter] = []
        self.copies: list[torch.nn.Parameter] = []
        copy_of: dict[int, torch.nn.Parameter] = {}
        self._hooks = []
        for module in model.modules():
            owned = {}
            for name, param in list(module._parameters.items()):
                if param is None or not param.requires_grad or param.dtype != torch.float32:
                    continue
                if id(param) not in copy_of:
                    copy = torch.nn.Parameter(param.detach().to(COMPUTE_DTYPE), requires_grad=True)
                    copy_of[id(param)] = copy
                    self.masters.append(param)
                    self.copies.append(copy)
                # a module's _parameters is its registry of parameters; setattr would refuse no tensor here, but
                # goes through __setattr__'s checks for each of thousands of swaps for nothing
                module._parameters[name] = copy_of[id(param)]
                owned[name] = param
            if owned:
                self._hooks.append(module.register_state_dict_post_hook(_save_masters(owned)))
                self._hooks.append(module.register_load_state_dict_pre_hook(_load_masters(owned)))

    def __len__(self) -> int:
        return len(self.masters)

    def numel(self) -> int:
        return sum(p.numel() for p in self.masters)

    @torch.no_grad()
    def grads_to_masters(self) -> None:
        """The copies' bf16 gradients as the masters' fp32 ones, one tensor at a time (each bf16 gradient freed as
        its fp32 one is made: 2 more bytes a parameter at the peak, not 4)."""
        for master, copy in zip(self.masters, self.copies, strict=True):
            master.grad = None if copy.grad is None else copy.grad.to(torch.float32)
            copy.grad = None

    @torch.no_grad()
    def masters_to_copies(self) -> None:
        """The updated masters rounded to bf16 into the copies; the masters' gradients freed."""
        for master, copy in zip(self.masters, self.copies, strict=True):
            copy.copy_(master)
            master.grad = None


def _save_masters(owned: dict[str, torch.nn.Parameter]):
    def hook(module, state_dict, prefix, local_metadata):
        for name, master in owned.items():
            if prefix + name in state_dict:
                state_dict[prefix + name] = master.detach()
    return hook


def _load_masters(owned: dict[str, torch.nn.Parameter]):
    @torch.no_grad()
    def hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        for name, master in owned.items():
            value = state_dict.get(prefix + name)
            if isinstance(value, torch.Tensor) and value.shape == master.shape:
                master.copy_(value)  # the module's own loading then sets the bf16 copy
    return hook


def check(args: dict, config: str) -> None:
    """The settings it works under (the module docstring's limits), given `mire_master_weights=true` (read with
    train.own_flag); anything else refused in one line naming the key that conflicts."""

    def refuse(key: str, why: str) -> MireInputError:
        return MireInputError(problem(config, None, KEY, f"not with {key}: {why}"))

    if args.get("deepspeed"):
        raise refuse("deepspeed", "DeepSpeed keeps master weights of its own")
    if args.get("fsdp") or args.get("fsdp_config"):
        raise refuse("fsdp", "FSDP keeps its own parameters")
    if str(args.get("pure_bf16", False)).lower() == "true":
        raise refuse("pure_bf16", "pure_bf16 keeps no fp32 weights to be masters")
    steps = args.get("gradient_accumulation_steps", 1)
    if str(steps).strip() != "1":
        raise refuse(f"gradient_accumulation_steps={steps}", "gradients summed over micro-batches would add up in "
                                                             "bf16; set it to 1 (neat_packing fills a step)")


def callback(config: str = ""):
    """A TrainerCallback: the swap when training begins (one stderr line on rank 0, kept as `line`), the gradients
    to the masters before each optimizer step, the masters to the copies after it."""
    from transformers import TrainerCallback

    class MireMasterWeights(TrainerCallback):
        line: str | None = None
        weights: MasterWeights | None = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if args.world_size > 1:
                raise MireInputError(problem(config, None, KEY, f"one process only, got {args.world_size}: DDP's "
                                                                "reducer keeps the parameters it was built with"))
            from .checkpoint_layers import unwrap

            self.weights = MasterWeights(unwrap(model))
            if not len(self.weights):
                self.line = "master weights: no trained fp32 parameter (nothing to keep in bf16)"
            else:
                self.line = (f"master weights: {len(self.weights)} trained tensors "
                             f"({self.weights.numel() / 1e6:,.1f}M parameters) in bf16 in the model, fp32 in the "
                             "optimizer")
            if state.is_world_process_zero:
                print(f"mire_factory.train: {self.line}", file=sys.stderr, flush=True)

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if self.weights is not None:
                self.weights.grads_to_masters()

        def on_optimizer_step(self, args, state, control, **kwargs):
            if self.weights is not None:
                self.weights.masters_to_copies()

    return MireMasterWeights()
