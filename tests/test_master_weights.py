"""mire_factory/master_weights.py (`mire_master_weights=true`): the model computes from bf16 copies, the optimizer
updates fp32 masters, updates below bf16's resolution are kept, checkpoints hold the masters and a resumed run goes
on as the uninterrupted one; settings it cannot work under are refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import call_main
from mire_factory import master_weights
from mire_factory.io import MireInputError


class TiedModel(torch.nn.Module):
    """An embedding and an output layer sharing one weight (as the 2B Qwen2-VL ties them), a norm, and a frozen
    layer in bf16 (LLaMA-Factory loads in the compute dtype and upcasts only what it trains)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(16, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.frozen = torch.nn.Linear(8, 8).requires_grad_(False).to(torch.bfloat16)
        self.head = torch.nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.frozen(self.norm(self.embed(ids))))


def loss_of(model, ids):
    return torch.nn.functional.cross_entropy(model(ids).float().flatten(0, 1), ids.flatten())


def test_the_model_computes_in_bf16_and_the_optimizer_updates_the_fp32_masters():
    model = TiedModel()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    trained = list(optimizer.param_groups[0]["params"])
    weights = master_weights.MasterWeights(model)
    assert len(weights) == 3 and weights.masters == trained  # embed (tied with head), norm weight and bias
    assert model.head.weight is model.embed.weight and model.head.weight.dtype == torch.bfloat16  # one tied copy
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}
    assert model.frozen.weight.dtype == torch.bfloat16 and not model.frozen.weight.requires_grad  # left alone
    ids = torch.arange(12).reshape(2, 6)
    for _ in range(3):
        loss_of(model, ids).backward()
        assert all(m.grad is None for m in weights.masters) and all(c.grad is not None for c in weights.copies)
        expected = [c.grad.float() for c in weights.copies]
        weights.grads_to_masters()
        assert all(c.grad is None for c in weights.copies)
        for master, grad in zip(weights.masters, expected, strict=True):
            assert master.grad.dtype == torch.float32 and torch.equal(master.grad, grad)
        optimizer.step()
        weights.masters_to_copies()
        for master, copy in zip(weights.masters, weights.copies, strict=True):
            assert master.dtype == torch.float32 and master.grad is None
            assert torch.equal(copy, master.to(torch.bfloat16))
    assert any(not torch.equal(m, m.to(torch.bfloat16).float()) for m in weights.masters)  # fp32 bits kept


def test_updates_below_bf16_resolution_add_up_in_the_masters():
    """A weight of 1.0 (bf16's step there is 2^-7) moved by 1e-4 a step: in bf16 it never moves; with masters the
    100 updates add up to 0.01 and the model's copy follows."""

    def train(with_masters: bool) -> tuple[float, float]:
        layer = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.ones_(layer.weight)
        if not with_masters:
            layer.to(torch.bfloat16)
        optimizer = torch.optim.SGD(layer.parameters(), lr=1e-4)
        weights = master_weights.MasterWeights(layer) if with_masters else None
        for _ in range(100):
            layer(torch.ones(1, 1, dtype=torch.bfloat16)).sum().backward()  # gradient 1.0
            if weights:
                weights.grads_to_masters()
            optimizer.step()
            optimizer.zero_grad()
            if weights:
                weights.masters_to_copies()
        master = optimizer.param_groups[0]["params"][0]
        return master.item(), layer.weight.item()

    assert train(with_masters=False) == (1.0, 1.0)  # every update rounded away
    master, copy = train(with_masters=True)
    assert master == pytest.approx(0.99, abs=1e-5)
    assert copy == torch.tensor(0.99).to(torch.bfloat16).item() != 1.0


def test_state_dict_gives_the_masters_and_load_state_dict_sets_them():
    model = TiedModel()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights = master_weights.MasterWeights(model)
    saved = model.state_dict()
    assert saved.keys() == before.keys()
    for key, value in before.items():
        assert saved[key].dtype == value.dtype and torch.equal(saved[key], value), key  # not the bf16 copies
    assert saved["embed.weight"].dtype == torch.float32
    new = {k: v + 1e-3 for k, v in before.items()}
    model.load_state_dict(new)
    for master in weights.masters:
        assert master.dtype == torch.float32
    assert torch.equal(weights.masters[0], new["embed.weight"])
    assert torch.equal(model.embed.weight, new["embed.weight"].to(torch.bfloat16))
    assert torch.equal(model.state_dict()["head.weight"], new["embed.weight"])


@pytest.mark.parametrize(("overrides", "message"), [
    ({"mire_master_weights": "maybe"}, "must be true or false, got 'maybe'"),
    ({"deepspeed": "configs/ds_zero3.json"}, "not with deepspeed: DeepSpeed keeps master weights of its own"),
    ({"pure_bf16": True}, "not with pure_bf16: pure_bf16 keeps no fp32 weights to be masters"),
    ({"gradient_accumulation_steps": 8}, "not with gradient_accumulation_steps=8: gradients summed over micro-"
                                          "batches would add up in bf16; set it to 1 (neat_packing fills a step)"),
])
def test_settings_it_cannot_work_under_are_refused_in_one_line(overrides, message):
    """As the launcher reads it: own_flag (true/false, removed from LLaMA-Factory's arguments), then check."""
    from mire_factory.train import own_flag

    args = {"mire_master_weights": True, "gradient_accumulation_steps": 1, **overrides}
    with pytest.raises(MireInputError) as info:
        if own_flag(args, master_weights.KEY, False, "c.yaml"):
            master_weights.check(args, "c.yaml")
    assert info.value.lines == [f"c.yaml: field 'mire_master_weights': {message}"]
    assert master_weights.KEY not in args
    master_weights.check({"gradient_accumulation_steps": "1", "pure_bf16": "false"}, "c.yaml")  # accepted


def train_steps(model_dir, data_dir, out, *extra) -> tuple[list[tuple[float, float]], str]:
    """(loss, grad_norm) of each optimizer step of `python -m mire_factory.train` (in-process, CPU), and stderr."""
    from mire_factory import train

    proc = call_main(train.main, "configs/qwen2_vl_2b_full_sft.yaml", f"model_name_or_path={model_dir}",
                     f"dataset_dir={data_dir}", f"output_dir={out}", "bf16=false", "eval_strategy='no'",
                     "image_max_pixels=12544", "preprocessing_num_workers=1", "dataloader_num_workers=0",
                     "per_device_train_batch_size=2", "gradient_accumulation_steps=1", "logging_steps=1",
                     "warmup_ratio=0", "plot_loss=false", "learning_rate=1e-3", "report_to=none", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [(e["loss"], e["grad_norm"]) for e in logged if "grad_norm" in e], proc.stderr


@pytest.mark.slow
def test_a_training_keeps_fp32_masters_saves_them_and_resumes_as_uninterrupted(tiny_model_dir, tiny_train_data,
                                                                                tmp_path, monkeypatch):
    """Three real optimizer steps with fp32 weights, then with mire_master_weights (a checkpoint at step 2), then
    resumed from that checkpoint: bf16 compute follows fp32 within bf16's rounding; the checkpoint and the final
    model are fp32 masters (bits bf16 has not); the resumed step 3 is the uninterrupted one's."""
    from safetensors.torch import load_file

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    steps = ("max_steps=3", "save_strategy=steps", "save_steps=2", "save_only_model=false")
    fp32, fp32_err = train_steps(tiny_model_dir, tiny_train_data, tmp_path / "fp32", *steps)
    out = tmp_path / "master"
    master, err = train_steps(tiny_model_dir, tiny_train_data, out, *steps, "mire_master_weights=true")
    assert "master weights" not in fp32_err
    assert err.count("mire_factory.train: master weights: ") == 1
    assert "in bf16 in the model, fp32 in the optimizer" in err
    assert "parameters {'float32': " in err  # OptimizerReport: the optimizer holds the fp32 masters
    assert len(master) == 3 and len({loss for loss, _ in master}) == 3
    for (loss_fp32, norm_fp32), (loss, norm) in zip(fp32, master, strict=True):
        assert loss == pytest.approx(loss_fp32, rel=0.02) and norm == pytest.approx(norm_fp32, rel=0.05)
    for path in (out / "model.safetensors", out / "checkpoint-2" / "model.safetensors"):
        tensors = load_file(path)
        trained = [t for name, t in tensors.items() if "visual" not in name]  # the language model
        assert trained and {t.dtype for t in trained} == {torch.float32}, path
        assert any(not torch.equal(t, t.to(torch.bfloat16).float()) for t in trained), path  # masters, not copies

    resumed, _ = train_steps(tiny_model_dir, tiny_train_data, tmp_path / "resumed", *steps, "mire_master_weights=true",
                             f"resume_from_checkpoint={out / 'checkpoint-2'}", "overwrite_output_dir=false")
    assert resumed[-1][0] == pytest.approx(master[-1][0], rel=1e-5) and resumed[-1][1] == pytest.approx(master[-1][1],
                                                                                                      rel=1e-4)


@pytest.mark.slow
def test_the_launcher_refuses_it_with_gradient_accumulation_in_one_line(tiny_model_dir, tmp_path):
    from mire_factory import train

    proc = call_main(train.main, "configs/qwen2_vl_7b_1gpu_full_sft.yaml", f"model_name_or_path={tiny_model_dir}",
                     f"output_dir={tmp_path}", "mire_master_weights=true")
    assert proc.returncode == 2
    assert proc.stderr == ("error: configs/qwen2_vl_7b_1gpu_full_sft.yaml: field 'mire_master_weights': not with "
                           "gradient_accumulation_steps=8: gradients summed over micro-batches would add up in bf16; "
                           "set it to 1 (neat_packing fills a step)\n")
