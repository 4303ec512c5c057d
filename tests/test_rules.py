"""The competition rules live in mire_factory/rules.py, and every tool that enforces one takes it from there."""

from __future__ import annotations

import contextlib
import io
import json
import struct

import pytest

from mire_factory import rules
from mire_factory.io import MireInputError, run_cli


def call(main, *args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as info:
        run_cli(main, [str(a) for a in args])
    return info.value.code or 0, out.getvalue(), err.getvalue()


def test_the_limits_everyone_uses_are_the_rules():
    from mire_factory.f1_callback import F1Callback
    from mire_factory.infer.args import InferArgs
    from tools.merge_cot import MergeCotArguments

    assert (rules.MAX_NEW_TOKENS, rules.MAX_MODEL_CALLS, rules.MAX_PARAMETERS) == (100, 3, 10**10)
    assert InferArgs().max_new_tokens == rules.MAX_NEW_TOKENS
    assert MergeCotArguments(dataset_file="d", reasons_file=["r"], output_file="o").max_output_tokens == 100
    assert F1Callback().max_new_tokens == rules.MAX_NEW_TOKENS
    with pytest.raises(ValueError, match=r"1\.\.100"):
        F1Callback(max_new_tokens=101)


def test_101_output_tokens_are_refused_by_every_tool(tmp_path):
    from mire_factory.train import make_callback
    from tools import merge_cot, vllm_infer

    code, _, err = call(vllm_infer.main, "--model_name_or_path", "m", "--dataset", "mire_test", "--dataset_dir",
                        tmp_path, "--max_new_tokens", "101", "--save_name", tmp_path / "p.jsonl")
    assert code == 2 and "--max_new_tokens 101 exceeds the competition limit of 100" in err
    assert "--no_competition_limits" in err and not (tmp_path / "p.jsonl").exists()
    code, _, err = call(merge_cot.main, "--dataset_file", tmp_path / "d.json", "--reasons_file", tmp_path / "r.jsonl",
                        "--output_file", tmp_path / "o.json", "--max_output_tokens", "101")
    assert code == 2 and err.strip() == ("error: --max_output_tokens 101 exceeds the competition limit of 100 output "
                                         "tokens per sample; pass --no_competition_limits to allow it")
    code, _, err = call(merge_cot.main, "--dataset_file", tmp_path / "d.json", "--reasons_file", tmp_path / "r.jsonl",
                        "--output_file", tmp_path / "o.json", "--max_output_tokens", "101", "--no_competition_limits")
    assert code == 2 and "d.json" in err and "competition" not in err  # past the rule: the missing file is next
    with pytest.raises(MireInputError, match="competition rule"):
        make_callback({"mire_f1_max_new_tokens": 101}, "train.yaml")


def test_four_models_voting_is_refused_unless_lifted(tmp_path):
    from mire_factory.synthetic import make_records, write_dataset
    from tools import vote

    records = make_records(2, 2, tmp_path / "images", seed=0, max_dialogue_images=0)
    write_dataset(tmp_path / "test.json", records)
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps({"id": r["id"], "predict": r["output"]}, ensure_ascii=False) + "\n"
                             for r in records), encoding="utf-8")
    args = [a for _ in range(4) for a in ("--prediction_file", preds)]
    args += ["--test_file", tmp_path / "test.json", "--save_path", tmp_path / "v.jsonl"]
    code, _, err = call(vote.main, *args)
    assert code == 2 and "4 model calls per sample exceed the competition limit of 3" in err
    assert not (tmp_path / "v.jsonl").exists()
    code, out, err = call(vote.main, *args, "--no_competition_limits")
    assert code == 0 and "4/4 records unanimous" in out, err


def sparse_safetensors(path, rows: int, cols: int) -> None:
    """A valid safetensors file holding one int8 tensor of rows x cols, its data a hole (no disk used)."""
    n = rows * cols
    header = json.dumps({"w": {"dtype": "I8", "shape": [rows, cols], "data_offsets": [0, n]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + n)


def test_parameters_are_counted_from_the_weights_headers(tiny_model_dir, tmp_path):
    from safetensors.numpy import load_file

    loaded = sum(t.size for p in tiny_model_dir.glob("*.safetensors") for t in load_file(p).values())
    assert rules.count_parameters(tiny_model_dir) == loaded > 0
    assert rules.count_parameters(tmp_path) is None and rules.count_parameters("Qwen/Qwen2-VL-2B") is None
    (tmp_path / "broken.safetensors").write_bytes(b"not a header")
    with pytest.raises(MireInputError, match="broken.safetensors: not a readable safetensors file"):
        rules.count_parameters(tmp_path)


def test_a_10b_model_is_refused_before_anything_is_written(tmp_path):
    from test_infer_units import write_sharegpt

    from mire_factory.infer.args import InferArgs
    from mire_factory.infer.pipeline import check_model_size
    from mire_factory.synthetic import make_records
    from tools import vllm_infer

    model = tmp_path / "big"
    model.mkdir()
    sparse_safetensors(model / "model.safetensors", 100_000, 100_000)  # 10,000,000,000 parameters
    ds = write_sharegpt(make_records(1, 1, tmp_path / "src", seed=0), tmp_path / "src", tmp_path / "ds")
    code, _, err = call(vllm_infer.main, "--model_name_or_path", model, "--dataset", "mire_test", "--dataset_dir", ds,
                        "--save_name", tmp_path / "p.jsonl")
    assert code == 2 and f"{model}: 10.00B parameters; the competition allows fewer than 10B" in err, err
    assert not (tmp_path / "p.jsonl").exists() and not (tmp_path / "p.jsonl.meta.json").exists()
    check_model_size(InferArgs(model_name_or_path=str(model), no_competition_limits=True))  # lifted: no refusal
    sparse_safetensors(model / "model.safetensors", 99_999, 100_000)
    check_model_size(InferArgs(model_name_or_path=str(model)))
