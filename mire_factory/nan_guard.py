"""Stops training at the first logged non-finite `grad_norm` or `loss`, instead of training on for hours and saving
a model of NaN weights (measured on an H200: grad_norm NaN from the first optimizer step, then "loss 0.0" at every
log, and a model that answers "!!!!!!").

The trainer's `logging_nan_inf_filter` (on by default) replaces a NaN or inf step loss by the mean of the previous
ones, so after divergence the logged `loss` reads 0.0 (at the first logged step: 0.0 from the start) while
`grad_norm` (the norm of the last step's gradients, computed before clipping) shows NaN: grad_norm is the reliable
signal, the loss the fallback where no grad_norm is logged. NaN gradients make NaN weights at the optimizer step, so
every later grad_norm is NaN too and the first log after the event catches it, whatever `logging_steps` is. The
first step is always logged (as `logging_first_step` would): a run broken from its first step, as on the H200,
stops after one optimizer step instead of `logging_steps`.

On a non-finite value: the callback stops training, cancels the evaluation and checkpoint of that step, and raises
`TrainingDiverged` at the end of `trainer.train()`, before LLaMA-Factory saves the final model; `mire_factory.train`
prints it as one line and exits EXIT_DIVERGED. Every rank sees the same logged values (the loss is averaged over
ranks, the gradient norm is global), so under torchrun all ranks stop at the same step.

With fp16 a dynamic loss scaler skips steps whose gradients overflow (an inf grad_norm there is expected, often in
the first steps), so with `fp16` only the loss is checked.
"""

from __future__ import annotations

import math

from transformers import TrainerCallback

CHECKED_KEYS = ("grad_norm", "loss")
FIXES = ("on Hopper GPUs the cuDNN SDPA backend's backward (pytorch/pytorch#196678; mire_factory.train disables it "
         "unless mire_cudnn_sdp=true), `flash_attn=disabled` (eager attention), a lower learning_rate, or bf16 "
         "overflow (`bf16=false`)")


class TrainingDiverged(Exception):
    """Training stopped at a non-finite logged value; the message is one line naming the step, the value and the
    likely fixes."""


def non_finite(logs: dict, check_grad_norm: bool = True) -> tuple[str, float] | None:
    """The first checked key of a trainer log entry whose value is NaN or inf, with that value."""
    for key in CHECKED_KEYS:
        if key == "grad_norm" and not check_grad_norm:
            continue
        value = logs.get(key)
        if isinstance(value, (int, float)) and not math.isfinite(value):
            return key, float(value)
    return None


class NanGuardCallback(TrainerCallback):
    def __init__(self):
        self.failure: str | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.failure is not None or not logs:
            return
        found = non_finite(logs, check_grad_norm=not getattr(args, "fp16", False))
        if found is None:
            return
        key, value = found
        first = not any("loss" in entry for entry in state.log_history[:-1])  # the entry itself is appended first
        self.failure = (f"training diverged: {key} is {value} at step {state.global_step}"
                        f"{' (the first logged step)' if first else ''}"
                        f"; stopped, no final model saved. Likely causes: {FIXES}. "
                        "`mire_nan_guard=false` trains on regardless")
        control.should_training_stop = True
        control.should_save = False  # not this step's checkpoint of broken weights
        control.should_evaluate = False

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:  # after the trainer's own flow callback, which only logs it with logging_first_step
            control.should_log = True

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.failure is not None:  # an epoch-strategy save or evaluation after the stop
            control.should_save = False
            control.should_evaluate = False

    def on_train_end(self, args, state, control, **kwargs):
        if self.failure is not None:  # raised out of trainer.train(): LLaMA-Factory's save_model() is not reached
            close_progress_bars()
            raise TrainingDiverged(self.failure)


def close_progress_bars() -> None:
    """The trainer's progress bar is closed by a callback after this one, which the exception skips; left open, tqdm
    would redraw it (a carriage return) over the error line when the process ends."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
