"""Liger's RMSNorm, SwiGLU, LayerNorm and M-RoPE kernels in Qwen2-VL's layers, without its cross entropy
(`mire_liger_layers=true`).

Why: outside its matmuls a packed 7B step spends about a fifth of its time in elementwise work: in a profiled step on
an H200 (K=0, master weights; BENCHMARKS.md, issue 20) multiplies took 0.10 s and dtype copies 0.09 s of 1.18 s, much
of it RMSNorm (its fp32 upcast and back), SiLU times up-projection and the rotary embedding, each several kernels
forward and backward where Liger runs one. LLaMA-Factory's `enable_liger_kernel` (and the Trainer's
`use_liger_kernel`) apply Liger's fused linear cross entropy with them for SFT: that replaces the model's forward,
and so cannot go with `mire_label_logits_only`, which keeps the output layer at the label positions alone (at 7B the
fused loss over every position measured no faster than that, BENCHMARKS.md's eleventh lease).

How: when training begins, Liger's own `apply_liger_kernel_to_qwen2_vl` (or `_qwen2_5_vl`) is given the model
instance with `cross_entropy` and `fused_linear_cross_entropy` off: it rebinds the forwards of the decoder layers'
norms and MLPs (and of the vision blocks' LayerNorms), and in transformers' Qwen2-VL module it replaces the rotary
function and the norm and MLP class names (so a Qwen2-VL built later in the same process gets them too; training
builds none). The parameters stay
where they are (master weights and checkpointing are unaffected) and the loss is the model's own. Liger's kernels are
Triton on CUDA: refused in one line without a GPU, with Liger missing, or with Liger's loss also asked for.
"""

from __future__ import annotations

import sys

from .io import MireInputError, problem

KEY = "mire_liger_layers"
# model_type -> Liger's function for it (liger_kernel.transformers); other models are refused
APPLY = {"qwen2_vl": "apply_liger_kernel_to_qwen2_vl", "qwen2_5_vl": "apply_liger_kernel_to_qwen2_5_vl"}
# the switches that apply Liger with its fused loss (LLaMA-Factory's, the Trainer's)
LOSS_KEYS = ("enable_liger_kernel", "use_liger_kernel")


def liger_loss_key(args: dict) -> str | None:
    """The first of LOSS_KEYS set true in `args`, else None."""
    return next((key for key in LOSS_KEYS if str(args.get(key, False)).lower() == "true"), None)


def check(args: dict, config: str) -> None:
    """Refuse, in one line naming the key, what `mire_liger_layers=true` cannot run with."""
    key = liger_loss_key(args)
    if key:
        raise MireInputError(problem(config, None, KEY, f"not with {key}: that applies Liger's fused cross entropy "
                                                        "too; set only one of them"))
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        raise MireInputError(problem(config, None, KEY, "Liger is not installed: pip install -e '.[liger]'")) from None
    import torch

    if not torch.cuda.is_available():
        raise MireInputError(problem(config, None, KEY, "needs a CUDA GPU (Liger's kernels are Triton kernels)"))


def apply(model, config: str = "") -> str:
    """Liger's layer kernels on `model` (wrappers are searched); returns a line saying what was patched."""
    import liger_kernel.transformers as liger

    from .checkpoint_layers import unwrap

    model = unwrap(model)
    model_type = getattr(model.config, "model_type", None)
    if model_type not in APPLY:
        raise MireInputError(problem(config, None, KEY, f"Liger's layer kernels are wired for {', '.join(APPLY)}, "
                                                      f"not {model_type!r}"))
    getattr(liger, APPLY[model_type])(rope=True, cross_entropy=False, fused_linear_cross_entropy=False,
                                      rms_norm=True, swiglu=True, model=model)
    names = [m._get_name() for m in model.modules()]
    return (f"Liger layer kernels: {names.count('LigerRMSNorm')} RMSNorm, {names.count('LigerSwiGLUMLP')} SwiGLU MLP, "
            f"{names.count('LigerLayerNorm')} LayerNorm modules, M-RoPE; the loss is the model's own")


def callback(config: str = ""):
    """A TrainerCallback applying the kernels when training begins (one stderr line on rank 0, kept as `line`)."""
    from transformers import TrainerCallback

    class MireLigerLayers(TrainerCallback):
        line: str | None = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.line = apply(model, config)
            if state.is_world_process_zero:
                print(f"mire_factory.train: {self.line}", file=sys.stderr, flush=True)

    return MireLigerLayers()
