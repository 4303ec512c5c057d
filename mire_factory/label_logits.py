"""Training logits only where a label is: the output layer and the loss at the answer positions, not at every
position of the prompt.

Why: an SFT record of this task is a prompt of hundreds to thousands of tokens and an answer of a few (a label, or a
reason under 100 tokens); its labels are -100 everywhere else. transformers' causal-LM forward still computes the
151,936-token output layer at every position and upcasts all of it to fp32 for the loss: on the demo's CPU that is
4.5 s of a step in fp32 (1,400 positions), against 0.1 s at the ~20 label positions
(benchmarks/bench_demo_train.py --what lm_head). On a GPU it is a 7B step's 545M-parameter output layer at every
position and gigabytes of fp32 logits per micro-batch (not measured on a GPU yet).
Why it is exact: the loss is the same sum of cross-entropy terms (positions whose next token is a label) with the
same normalization (the mean over label tokens, or the sum over num_items_in_batch under gradient accumulation),
through the model's own `loss_function`; the positions dropped only ever contributed ignored terms.

transformers' causal-LM heads take `logits_to_keep` (a tensor of positions); `enable(model)` wraps the model's
forward so that a training call with labels asks for the label positions only (the union over the batch's rows) and
computes the loss itself. Anything else (evaluation, generation, no labels, a model without `logits_to_keep`) runs
the forward as it is. `mire_factory.train` does it with `mire_label_logits_only=true`.
"""

from __future__ import annotations

import functools
import inspect
import logging

import torch

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def label_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions (1D, sorted) whose next token is a label in any row, and the shifted labels at them (B, K)."""
    shifted = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    keep = torch.nonzero((shifted != IGNORE_INDEX).any(0)).flatten()
    return keep, shifted[:, keep].contiguous()


def supports(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def enable(model) -> bool:
    """Wrap model.forward (the instance's: mixed-precision wrappers already set there are kept inside; under a PEFT
    wrapper, its base model's); False (and a log line) when that forward takes no logits_to_keep."""
    if hasattr(model, "get_base_model"):  # a PEFT (LoRA) wrapper: its base model computes the logits
        model = model.get_base_model()
    if getattr(model, "_mire_label_logits_only", False):
        return True
    if not supports(model):
        logger.warning("label logits only not enabled: %s.forward takes no logits_to_keep", type(model).__name__)
        return False
    forward = model.forward

    @functools.wraps(forward)  # generate() validates its kwargs against the forward's signature
    def forward_label_logits(*args, labels=None, **kwargs):
        if labels is None or not model.training or "logits_to_keep" in kwargs or args:
            return forward(*args, labels=labels, **kwargs)
        keep, shift_labels = label_positions(labels)
        outputs = forward(labels=None, logits_to_keep=keep, **kwargs)
        outputs.loss = model.loss_function(logits=outputs.logits, labels=None, vocab_size=outputs.logits.shape[-1],
                                           shift_labels=shift_labels,
                                           num_items_in_batch=kwargs.get("num_items_in_batch"))
        return outputs

    model.forward = forward_label_logits
    model._mire_label_logits_only = True
    return True


def callback():
    """A TrainerCallback that calls `enable` on the model when training begins (after LLaMA-Factory loaded it and the
    Trainer prepared it); its `enabled` says whether it took."""
    from transformers import TrainerCallback

    class MireLabelLogits(TrainerCallback):
        enabled = False

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.enabled = enable(model)
            if self.enabled:
                logger.warning("training logits: at label positions only (mire_label_logits_only)")

    return MireLabelLogits()
