"""Tool arguments: one dataclass gives the flags and the keys of a YAML --config (mire_factory/hparams.py); flags
given override the config; every problem is one line and exit 2."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json

import pytest
import yaml

from mire_factory.hparams import given_flags, parse_args
from mire_factory.io import MireInputError, run_cli
from mire_factory.synthetic import make_records, write_dataset
from tools import distill, merge_cot
from tools.distill import DistillArguments


def call(main, *args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as info:
        run_cli(main, [str(a) for a in args])
    return info.value.code or 0, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    root = tmp_path_factory.mktemp("hparams")
    write_dataset(root / "train.json", make_records(2, 2, root / "images", seed=3, max_dialogue_images=0))
    return root / "train.json", root / "images"


def write_yaml(path, data: dict):
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def test_distill_reads_a_yaml_config_and_flags_override_it(train, tmp_path):
    data, images = train
    config = write_yaml(tmp_path / "distill.yaml", {
        "input_file": str(data), "image_dir": str(images), "model": "teacher-72b", "mode": [2],
        "max_chars": 50, "concurrency": 4, "dry_run": True, "base_url": "http://127.0.0.1:9/v1"})
    args = parse_args(DistillArguments, ["--config", str(config), "--max_chars", "20", "--mode", "3", "3"])
    assert isinstance(args, distill.DistillConfig)  # the tool's flags are the library's config, extended
    assert (args.model, args.concurrency, args.dry_run) == ("teacher-72b", 4, True)  # from the file
    assert (args.max_chars, args.modes) == (20, [3])  # from the flags (modes deduplicated)

    code, out, err = call(distill.main, "--config", config, "--max_chars", "20", "--mode", "3")
    request = json.loads(out)
    assert code == 0 and request["model"] == "teacher-72b"
    assert "不超过20个字" in request["messages"][0]["content"][-1]["text"]  # mode 3 with the flag's budget
    assert "dry run: 4 requests (4 records x modes [3])" in err


def test_vllm_infer_reads_a_yaml_config_and_flags_override_it(tmp_path):
    from mire_factory.infer.args import InferArgs, config_values

    config = write_yaml(tmp_path / "predict.yaml", {
        "model_name_or_path": "m", "eval_dataset": "mire_test", "dataset_dir": str(tmp_path), "template": "qwen2_vl",
        "cutoff_len": 4096, "image_max_pixels": 401408, "max_new_tokens": 64})
    args = parse_args(InferArgs, ["--config", str(config), "--cutoff_len", "2048", "--backend", "hf"],
                      config_values=config_values)
    assert (args.model_name_or_path, args.dataset, args.image_max_pixels, args.max_new_tokens) == (
        "m", "mire_test", 401408, 64)
    assert (args.cutoff_len, args.backend) == (2048, "hf")


def test_repeatable_flags_extend_and_override_the_config(tmp_path):
    config = write_yaml(tmp_path / "m.yaml", {"dataset_file": "d.json", "reasons_file": ["a.jsonl", "b.jsonl"],
                                              "output_file": "o.json"})
    args = parse_args(merge_cot.MergeCotArguments, ["--config", str(config)])
    assert args.reasons_file == ["a.jsonl", "b.jsonl"]
    args = parse_args(merge_cot.MergeCotArguments, ["--config", str(config), "--reasons_file", "c.jsonl",
                                                    "--reasons_file", "d.jsonl"])
    assert args.reasons_file == ["c.jsonl", "d.jsonl"]  # replaced, not appended to the file's


def test_given_flags_are_the_parsed_command_line_only():
    given = given_flags(DistillArguments, ["--no_progress", "--concurrency=3", "--max_c", "7", "--help"])
    assert given == {"progress": False, "concurrency": 3, "max_chars": 7}


@pytest.mark.parametrize("argv, config, message", [
    (["--mode", "4"], None, "argument --modes/--mode: invalid choice: 4"),
    (["--mode", "2", "--concurrency", "many"], None, "argument --concurrency: invalid int value: 'many'"),
    (["--mode", "2", "--no_such_flag"], None, "unrecognized arguments: --no_such_flag"),
    ([], None, "the following arguments are required: --modes/--mode"),
    (["--mode", "2", "--concurrency", "0"], None, "--concurrency must be at least 1"),
    (["--mode", "2"], {"concurrency": [1, 2]}, "field 'concurrency': expected a single value"),
    (["--mode", "2"], {"concurency": 2}, "field 'concurency': not a flag of this tool"),
    (["--mode", "2"], {"temperature": None}, "field 'temperature': needs a value"),
    ([], {"mode": [1, 5]}, "field 'modes': invalid choice: 5"),
])
def test_bad_flags_and_configs_are_one_line_and_exit_2(train, tmp_path, argv, config, message):
    data, images = train
    extra = ["--config", write_yaml(tmp_path / "c.yaml", config)] if config is not None else []
    code, out, err = call(distill.main, "--input_file", data, "--image_dir", images, "--model", "t", "--dry_run",
                          *argv, *extra)
    assert code == 2 and out == "" and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and message in err, err


def test_help_shows_every_flag_with_its_help_and_default():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as info:
        distill.main(["--help"])
    text = " ".join(out.getvalue().split())
    assert info.value.code == 0
    for f in dataclasses.fields(DistillArguments):
        assert f"--{f.name}" in text and " ".join(f.metadata["help"].split()[:4]) in text, f.name
    assert "--mode {1,2,3}" in text and "(default: 16)" in text and "--no_progress" in text


def test_a_dataclass_refusing_its_values_is_an_input_error():
    with pytest.raises(MireInputError, match="--base_url and --output_file are required"):
        parse_args(DistillArguments, ["--input_file", "x", "--image_dir", "y", "--model", "t", "--mode", "1"])
