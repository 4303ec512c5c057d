"""mire_factory/embedding_states.py (`mire_fp32_embedding_states=true`): under torchao's low-bit AdamW the input and
output embeddings get fp32 states, so an embedding row whose token is absent from a step is not sent far past Adam's
bound by a second moment rounded to zero. Real training runs with it are in test_loss_compare.py; its effect on a
real model's training is benchmarks/adam_state_training.py's (BENCHMARKS.md, issue 20)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import call_main
from mire_factory import train
from mire_factory.embedding_states import embedding_weights, keep_fp32
from mire_factory.io import MireInputError

LR = 1e-3


class TwoEmbeddings(torch.nn.Module):
    """An input embedding, a layer and an output layer, each a multiple of torchao's 256-element blocks."""

    def __init__(self, tied: bool = False):
        super().__init__()
        self.embed = torch.nn.Embedding(32, 256)
        self.layer = torch.nn.Linear(256, 256, bias=False)
        self.head = torch.nn.Linear(256, 32, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head


def _largest_second_step(make, fp32_embeddings: bool) -> tuple[float, dict]:
    """The largest element update of the embedding at step 2, after a step-1 gradient whose block spans nine orders
    of magnitude, in a step whose batch lacks the token (zero gradient); and the states."""
    torch.manual_seed(0)
    model = TwoEmbeddings()
    weight = model.embed.weight
    optimizer = make([weight, model.layer.weight])
    if fp32_embeddings:
        keep_fp32(optimizer, [weight])
    grad = torch.zeros_like(weight)
    grad[0] = torch.logspace(0, -9, 256)
    for step_grad in (grad, torch.zeros_like(weight)):
        weight.grad, model.layer.weight.grad = step_grad, torch.randn(256, 256)
        before = weight.detach().clone()
        optimizer.step()
    return float((weight.detach() - before).abs().max()), optimizer.state


def test_a_zero_second_moment_sends_8bit_updates_past_adams_bound_and_fp32_embedding_states_do_not():
    from torchao.optim import AdamW4bit, AdamW8bit
    from torchao.optim.subclass_8bit import OptimState8bit

    bound = 0.1 / math.sqrt(0.001) * LR  # (1 - beta1) / sqrt(1 - beta2) * lr: the most one Adam step moves
    reference, _ = _largest_second_step(lambda p: torch.optim.AdamW(p, lr=LR), False)
    eight_bit, _ = _largest_second_step(lambda p: AdamW8bit(p, lr=LR), False)
    kept, states = _largest_second_step(lambda p: AdamW8bit(p, lr=LR), True)
    assert reference <= bound
    assert eight_bit > 100 * bound  # the defect the switch is for: m / eps where the 8-bit v is zero
    assert kept == pytest.approx(reference, rel=1e-5)
    embedding, layer = (states[p] for p in states)
    assert [type(embedding[k]) for k in ("exp_avg", "exp_avg_sq")] == [torch.Tensor, torch.Tensor]
    assert embedding["exp_avg"].dtype == torch.float32 and float(embedding["step"]) == 2
    assert type(layer["exp_avg"]) is OptimState8bit  # the other weights keep 8-bit states
    four_bit, _ = _largest_second_step(lambda p: AdamW4bit(p, lr=LR), True)
    assert four_bit == pytest.approx(reference, rel=1e-5)


def test_the_embeddings_are_found_once_when_tied_and_not_when_frozen():
    model = TwoEmbeddings()
    assert embedding_weights(model) == [model.embed.weight, model.head.weight]
    tied = TwoEmbeddings(tied=True)
    assert embedding_weights(tied) == [tied.embed.weight]
    tied.embed.weight.requires_grad_(False)
    assert embedding_weights(tied) == []


def test_states_already_there_are_kept_and_the_line_says_what_was_done():
    from torchao.optim import AdamW8bit
    from torchao.optim.subclass_8bit import OptimState8bit

    model = TwoEmbeddings()
    optimizer = AdamW8bit(model.parameters(), lr=LR)
    model.head.weight.grad = torch.ones_like(model.head.weight)
    optimizer.step()  # the output layer's states now exist, 8-bit (as a checkpoint saved without the switch holds)
    line = keep_fp32(optimizer, embedding_weights(model))
    assert line == ("Adam states: fp32 for 2 embedding weights (0.0M parameters; 1 set now, 1 already had states), "
                    "AdamW8bit's elsewhere")
    assert type(optimizer.state[model.head.weight]["exp_avg"]) is OptimState8bit
    assert type(optimizer.state[model.embed.weight]["exp_avg"]) is torch.Tensor
    assert keep_fp32(optimizer, []) == "Adam states: no embedding is trained (every state stays low-bit)"


def test_an_optimizer_other_than_torchaos_or_a_weight_it_does_not_update_is_refused_in_one_line():
    model = TwoEmbeddings()
    with pytest.raises(MireInputError) as exc:
        keep_fp32(torch.optim.AdamW(model.parameters()), embedding_weights(model), "cfg.yaml")
    assert str(exc.value) == ("cfg.yaml: field 'mire_fp32_embedding_states': needs torchao's AdamW8bit or AdamW4bit "
                              "as the optimizer, got torch.optim.adamw.AdamW")
    from torchao.optim import AdamW8bit

    with pytest.raises(MireInputError) as exc:
        keep_fp32(AdamW8bit([model.layer.weight]), embedding_weights(model), "cfg.yaml")
    assert str(exc.value) == ("cfg.yaml: field 'mire_fp32_embedding_states': an embedding weight (32, 256) is not one "
                              "the optimizer updates")


def test_without_a_torchao_low_bit_optim_training_is_refused_in_one_line(tiny_model_dir, tiny_train_data, tmp_path,
                                                                        monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    proc = call_main(train.main, "configs/qwen2_vl_2b_full_sft.yaml", f"model_name_or_path={tiny_model_dir}",
                     f"dataset_dir={tiny_train_data}", f"output_dir={tmp_path / 'out'}", "optim=adamw_bnb_8bit",
                     "mire_fp32_embedding_states=true")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: configs/qwen2_vl_2b_full_sft.yaml: field 'mire_fp32_embedding_states': needs optim adamw_torch_8bit "
        "or adamw_torch_4bit (torchao's low-bit AdamW), got optim=adamw_bnb_8bit"]
    assert not (tmp_path / "out").exists()
