"""mire_factory/fp8_adam_states.py (`mire_fp8_adam_states=true`): torchao's AdamW8bit made its fp8 sibling before
its states exist; the updates stay AdamW's. Its speed and 2B loss curve are measured on the lent GPU (issue 20)."""

from __future__ import annotations

import pytest
import torch

from conftest import call_main
from mire_factory import train
from mire_factory.fp8_adam_states import use_fp8_states
from mire_factory.io import MireInputError


def _steps(make, fp8: bool, steps: int = 4) -> tuple[torch.Tensor, object]:
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(64, 256))
    optimizer = make([param])
    if fp8:
        use_fp8_states(optimizer)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        param.grad = torch.randn(64, 256, generator=generator)
        optimizer.step()
    return param.detach(), optimizer.state[param]


def test_fp8_states_update_as_adamw_does():
    from torchao.optim import AdamW8bit
    from torchao.optim.subclass_fp8 import OptimStateFp8

    kwargs = dict(lr=1e-2, weight_decay=0.01)
    reference, _ = _steps(lambda p: torch.optim.AdamW(p, **kwargs), fp8=False)
    eight_bit, _ = _steps(lambda p: AdamW8bit(p, **kwargs), fp8=False)
    fp8, state = _steps(lambda p: AdamW8bit(p, **kwargs), fp8=True)
    assert type(state["exp_avg"]) is OptimStateFp8 and type(state["exp_avg_sq"]) is OptimStateFp8
    start, _ = _steps(lambda p: torch.optim.SGD(p, lr=0.0), fp8=False)
    moved = (reference - start).abs().mean()
    # fp8 states follow fp32 AdamW as closely as 8-bit ones (a few % of how far the weights moved), not exactly
    assert 0 < (fp8 - reference).abs().mean() < 0.05 * moved
    assert (fp8 - reference).abs().mean() < 3 * (eight_bit - reference).abs().mean()


def test_an_optimizer_other_than_adamw8bit_is_refused_in_one_line():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(4))])
    with pytest.raises(MireInputError) as exc:
        use_fp8_states(optimizer, "cfg.yaml")
    assert str(exc.value) == ("cfg.yaml: field 'mire_fp8_adam_states': needs torchao's AdamW8bit as the optimizer, "
                              "got torch.optim.adamw.AdamW")


def test_without_optim_adamw_torch_8bit_training_is_refused_in_one_line(tiny_model_dir, tiny_train_data, tmp_path,
                                                                        monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    proc = call_main(train.main, "configs/qwen2_vl_2b_full_sft.yaml", f"model_name_or_path={tiny_model_dir}",
                     f"dataset_dir={tiny_train_data}", f"output_dir={tmp_path / 'out'}", "mire_fp8_adam_states=true")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: configs/qwen2_vl_2b_full_sft.yaml: field 'mire_fp8_adam_states': needs optim=adamw_torch_8bit "
        "(torchao's 8-bit AdamW, whose states it makes fp8), got optim=adamw_torch"]
    assert not (tmp_path / "out").exists()
