"""torchao's AdamW with fp8 states in place of its 8-bit one (`mire_fp8_adam_states=true`, with
`optim: adamw_torch_8bit`).

Why: torchao's AdamW8bit quantizes each state element by searching a 256-value map; in a profiled 7B packed step on
an H200 its step took 0.14 s of 1.18 s (12%; BENCHMARKS.md, issue 20), and bitsandbytes' 8-bit step was no faster.
torchao's AdamWFp8 keeps the same two states at the same size (one byte an element and a scale per 256-element
block), quantized by a scale and a cast to float8_e4m3fn. The update is the same: fp32 arithmetic on the fp32
weights (or masters, with `mire_master_weights`).

How: transformers' `optim` names reach AdamW8bit and AdamW4bit of torchao, not AdamWFp8, and LLaMA-Factory's
`run_exp` takes no optimizer of ours. The two classes are siblings that differ only in the static method creating a
state tensor (`_subclass_zeros`), and their states are created at the first step; so when training begins (the
Trainer has built the AdamW8bit) its class is set to AdamWFp8, after checking that this still holds for the
installed torchao. States loaded from a checkpoint keep the kind they were saved in.

Precision: on a real pretrained 0.5B model's gradients of real records its updates were about 6x as far from fp32
states' as AdamW8bit's (benchmarks/adam_state_error.py; BENCHMARKS.md, issue 20): an opt-in for speed measurements,
below the precision the one-GPU recipe keeps.
"""

from __future__ import annotations

import sys

from .io import MireInputError, problem

KEY = "mire_fp8_adam_states"
OPTIM = "adamw_torch_8bit"
# what the two torchao classes may define apart from their shared base (_AdamBase); `step` is torch's profiling
# wrapper of the base's step, which torch.optim.Optimizer.__init__ sets on the class of each optimizer it builds
_OWN = {"__init__", "_subclass_zeros", "step", "__doc__", "__module__", "__qualname__", "__firstlineno__",
        "__static_attributes__"}


def check(args: dict, config: str) -> None:
    """Refuse, in one line naming the key, a run whose optimizer is not torchao's AdamW8bit."""
    optim = str(args.get("optim", "adamw_torch"))
    if optim != OPTIM:
        raise MireInputError(problem(config, None, KEY, f"needs optim={OPTIM} (torchao's 8-bit AdamW, whose states it "
                                                        f"makes fp8), got optim={optim}"))


def _classes():
    from torchao.optim import AdamW8bit, AdamWFp8

    same_base = AdamW8bit.__bases__ == AdamWFp8.__bases__
    own_only = set(vars(AdamW8bit)) <= _OWN and set(vars(AdamWFp8)) <= _OWN
    return AdamW8bit, AdamWFp8, same_base and own_only


def use_fp8_states(optimizer, config: str = "") -> str:
    """Make the (possibly accelerate-wrapped) torchao AdamW8bit an AdamWFp8; returns a line saying so."""
    inner = getattr(optimizer, "optimizer", optimizer)
    adamw8bit, adamw_fp8, siblings = _classes()
    if type(inner) is not adamw8bit:
        raise MireInputError(problem(config, None, KEY, f"needs torchao's AdamW8bit as the optimizer, got "
                                                        f"{type(inner).__module__}.{type(inner).__name__}"))
    if not siblings:
        import torchao

        raise MireInputError(problem(config, None, KEY, f"torchao {torchao.__version__}'s AdamW8bit and AdamWFp8 "
                                                        "differ in more than their states; not supported"))
    inner.__class__ = adamw_fp8
    return f"Adam states: fp8 (torchao AdamWFp8, block {inner.block_size}) in place of AdamW8bit's 8-bit ones"


def callback(config: str = ""):
    """A TrainerCallback making the optimizer's states fp8 when training begins (one stderr line on rank 0)."""
    from transformers import TrainerCallback

    class MireFp8AdamStates(TrainerCallback):
        line: str | None = None

        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            self.line = use_fp8_states(optimizer, config)
            if state.is_world_process_zero:
                print(f"mire_factory.train: {self.line}", file=sys.stderr, flush=True)

    return MireFp8AdamStates()
