"""mire_factory/pack_padding.py: packed batches lose their trailing padding, and nothing else: the same losses and
gradient norms as the padded packs through `python -m mire_factory.train`."""

from __future__ import annotations

import pytest
import torch
from test_attention import lf_packed_mask, two_steps

from mire_factory import pack_padding


def packed_batch(indices: list[list[int]]) -> dict:
    length = len(indices[0])
    ids = torch.arange(len(indices) * length).reshape(len(indices), length)
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": lf_packed_mask(indices),
            "position_ids": ids[None].expand(3, -1, -1), "pixel_values": torch.zeros(4, length),
            "image_grid_thw": torch.tensor([[1, 2, 2]])}


def test_a_pack_is_cut_after_its_last_real_token_rounded_to_eight():
    # row 0 ends at position 10, row 1 at 12: every row keeps 16 (13 rounded up), the mask both token axes
    batch = packed_batch([[1] * 6 + [2] * 5 + [0] * 21, [1] * 13 + [0] * 19])
    out = pack_padding.trimmed(batch)
    for key in ("input_ids", "labels"):
        assert torch.equal(out[key], batch[key][:, :16])
    assert torch.equal(out["position_ids"], batch["position_ids"][..., :16])
    assert torch.equal(out["attention_mask"], batch["attention_mask"][:, :, :16, :16])
    assert out["pixel_values"] is batch["pixel_values"] and out["image_grid_thw"] is batch["image_grid_thw"]
    assert pack_padding.real_length(batch["attention_mask"]) == 13


def test_what_it_leaves_alone():
    assert pack_padding.trimmed(packed_batch([[1] * 12 + [2] * 4])) is None  # no padding
    assert pack_padding.trimmed(packed_batch([[1] * 10 + [0] * 6])) is None  # 10 rounds up to the 16 there are
    two_d = packed_batch([[1] * 4 + [0] * 12])
    two_d["attention_mask"] = torch.ones(1, 16)
    assert pack_padding.trimmed(two_d) is None  # the collator already pads those to the longest row
    unknown = packed_batch([[1] * 4 + [0] * 28])
    unknown["per_token_weights"] = torch.ones(1, 32)  # runs along the tokens, and this does not know it
    assert pack_padding.trimmed(unknown) is None
    boolean = packed_batch([[1] * 4 + [0] * 28])
    boolean["attention_mask"] = boolean["attention_mask"] == 0
    assert pack_padding.trimmed(boolean)["input_ids"].shape == (1, 8)


@pytest.mark.slow
def test_a_packed_training_trimmed_logs_the_same_losses(tiny_model_dir, tiny_train_data, tmp_path, monkeypatch):
    """Two optimizer steps of neat_packing with varlen attention, with and without mire_trim_padding (on by default
    with mire_packed_varlen): the packs ran shorter, and the losses and gradient norms are the padded packs'."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    lengths = []
    original = pack_padding.trimmed

    def recorded(kwargs):
        out = original(kwargs)
        lengths.append((kwargs["input_ids"].shape[-1], (out or kwargs)["input_ids"].shape[-1]))
        return out

    monkeypatch.setattr(pack_padding, "trimmed", recorded)
    common = ("per_device_train_batch_size=1", "neat_packing=true", "cutoff_len=1024", "mire_packed_varlen=true")
    padded = two_steps(tiny_model_dir, tiny_train_data, tmp_path / "padded", *common, "mire_trim_padding=false")
    assert lengths == []
    trimmed = two_steps(tiny_model_dir, tiny_train_data, tmp_path / "trimmed", *common)
    assert len(lengths) == 2 and all(given == 1024 for given, _ in lengths)  # every pack: cutoff_len
    assert any(run < given for given, run in lengths), lengths
    assert len(trimmed) == 2
    for (loss_padded, norm_padded), (loss_trimmed, norm_trimmed) in zip(padded, trimmed, strict=True):
        assert loss_trimmed == pytest.approx(loss_padded, rel=1e-5)
        assert norm_trimmed == pytest.approx(norm_padded, rel=1e-5)
