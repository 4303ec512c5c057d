"""mire_factory/liger_layers.py (`mire_liger_layers=true`): Liger's layer kernels on the model instance, its loss
left alone; refused in one line where it cannot run. The kernels themselves are Triton on CUDA: their speed and the
losses they train to are measured on the lent GPU (BENCHMARKS.md, issue 20)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, call_main
from mire_factory import train

APPLY_SCRIPT = r"""
import json, sys, torch
from transformers import Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl import modeling_qwen2_vl
from mire_factory import liger_layers

model = Qwen2VLForConditionalGeneration.from_pretrained(sys.argv[1], dtype=torch.float32)
before = {name: id(p) for name, p in model.named_parameters()}
forward = type(model).forward
line = liger_layers.apply(model)
text = model.model.language_model
print(json.dumps({
    "line": line,
    "layers": len(text.layers),
    "vision_blocks": len(model.model.visual.blocks),
    "mlp": sorted({layer.mlp._get_name() for layer in text.layers}),
    "norms": sorted({n._get_name() for layer in text.layers for n in (layer.input_layernorm,
                                                                       layer.post_attention_layernorm)}),
    "final_norm": text.norm._get_name(),
    "rope": modeling_qwen2_vl.apply_multimodal_rotary_pos_emb.__module__,
    "same_forward": type(model).forward is forward and "forward" not in vars(model),
    "same_parameters": before == {name: id(p) for name, p in model.named_parameters()},
}))
"""


def test_the_layer_kernels_are_bound_to_the_model_and_its_loss_is_its_own(tiny_model_dir):
    # a child process: Liger also replaces the module-level rotary function, which would stay replaced in this one
    proc = subprocess.run([sys.executable, "-c", APPLY_SCRIPT, str(tiny_model_dir)], cwd=REPO, capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["mlp"] == ["LigerSwiGLUMLP"] and got["norms"] == ["LigerRMSNorm"] and got["final_norm"] == "LigerRMSNorm"
    assert got["rope"].startswith("liger_kernel.")
    assert got["same_forward"], "the model's forward (and so mire_label_logits_only's loss) must stay the model's own"
    assert got["same_parameters"], "the parameters must stay the same objects (master weights, the optimizer)"
    n, blocks = got["layers"], got["vision_blocks"]
    assert got["line"] == (f"Liger layer kernels: {2 * n + 1} RMSNorm, {n} SwiGLU MLP, {2 * blocks} LayerNorm "
                           "modules, M-RoPE; the loss is the model's own")


def test_a_model_it_is_not_wired_for_is_refused_in_one_line():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mire_factory.io import MireInputError
    from mire_factory.liger_layers import apply

    model = Qwen2ForCausalLM(Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64))
    with pytest.raises(MireInputError) as exc:
        apply(model, "cfg.yaml")
    assert str(exc.value) == ("cfg.yaml: field 'mire_liger_layers': Liger's layer kernels are wired for qwen2_vl, "
                              "qwen2_5_vl, not 'qwen2'")


def _train(tiny_model_dir, tiny_train_data, tmp_path, *extra):
    return call_main(train.main, "configs/qwen2_vl_2b_full_sft.yaml", f"model_name_or_path={tiny_model_dir}",
                     f"dataset_dir={tiny_train_data}", f"output_dir={tmp_path / 'out'}", *extra)


@pytest.mark.parametrize("extra, words", [
    (["mire_liger_layers=true"], ["mire_liger_layers", "needs a CUDA GPU"]),
    (["mire_liger_layers=true", "enable_liger_kernel=true"], ["mire_liger_layers", "not with enable_liger_kernel"]),
    (["mire_liger_layers=true", "use_liger_kernel=true"], ["mire_liger_layers", "not with use_liger_kernel"]),
    (["mire_label_logits_only=true", "enable_liger_kernel=true"], ["mire_label_logits_only", "enable_liger_kernel",
                                                                   "mire_liger_layers=true"]),
    (["mire_liger_layers=maybe"], ["mire_liger_layers", "must be true or false"]),
])
def test_what_it_cannot_run_with_is_one_line_before_any_model_loads(tiny_model_dir, tiny_train_data, tmp_path,
                                                                    monkeypatch, extra, words):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    proc = _train(tiny_model_dir, tiny_train_data, tmp_path, *extra)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), lines
    assert lines[0].startswith("error: configs/qwen2_vl_2b_full_sft.yaml: field ")
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
