"""Fuzzing every tool with malformed inputs (tests/fuzz_cases.py): exit 0, 2 or 3 and never a traceback; after 2
the output tree is byte-identical; after 0 every written file parses. A few seconds per tool; the large campaign is
benchmarks/fuzz_campaign.py."""

from __future__ import annotations

import functools
import json

import pytest
from fault_server import RunningServer
from fuzz_cases import (
    PREDICTION_KEYS,
    REASON_KEYS,
    dataset_info_json,
    jsonl_file,
    make_material,
    mire_json,
    run_tool,
    sharegpt_json,
    teacher_body,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mire_factory.cot
from tools import analyze, cal_acc, convert, convert2submit, distill, merge_cot, validate, vllm_infer, vote

# deadline off: a loaded 2-core machine makes single examples slow for reasons that are not findings
FUZZ = settings(max_examples=25, deadline=None, database=None, derandomize=False,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    return make_material(tmp_path_factory.mktemp("fuzz"))


@pytest.fixture(scope="module")
def server():
    with RunningServer() as running:
        yield running


@pytest.fixture(autouse=True, scope="module")
def _tokenizer_once():
    """merge_cot loads the real Qwen2 tokenizer per call; once is enough here."""
    original = mire_factory.cot.qwen2_token_counter
    mire_factory.cot.qwen2_token_counter = functools.lru_cache(maxsize=1)(original)
    yield
    mire_factory.cot.qwen2_token_counter = original


def ok(result):
    assert not result.problems, "\n".join(result.problems) + f"\nstderr: {result.stderr[-1500:]}"


@FUZZ
@given(data=st.data())
def test_fuzz_validate_and_convert(material, data):
    raw = data.draw(mire_json(material.train_rows))
    src = material.root / "in.json"
    src.write_bytes(raw)
    out = material.fresh_output("validate")
    ok(run_tool(validate.main, ["--input_file", src, "--image_dir", material.images, "--verify_images"], out))
    out = material.fresh_output("convert", material.converted)
    extra = data.draw(st.sampled_from([[], ["--val_size", "0"], ["--task", "image"], ["--format", "swift"],
                                       ["--kind", "test"], ["--val_size", "0.5", "--task", "dialogue"]]))
    ok(run_tool(convert.main, ["--input_file", src, "--image_dir", material.images, "--output_dir", out, *extra], out))


def _predictions(material, data, name):
    path = material.root / name
    path.write_bytes(data.draw(jsonl_file(material.prediction_rows, PREDICTION_KEYS)))
    return path


@FUZZ
@given(data=st.data())
def test_fuzz_convert2submit_and_cal_acc(material, data):
    preds = _predictions(material, data, "p.jsonl")
    test = material.root / "test.json"
    test.write_bytes(data.draw(st.sampled_from([json.dumps(material.test_rows, ensure_ascii=False).encode()]))
                     if data.draw(st.booleans()) else data.draw(mire_json(material.test_rows)))
    out = material.fresh_output("submit")
    (out / "submit.csv").write_text("id,predict\nold,old\n", encoding="utf-8-sig")
    fill = ["--fill"] if data.draw(st.booleans()) else []
    ok(run_tool(convert2submit.main, ["--test_file", test, "--prediction_file", preds, "--save_path",
                                      out / "submit.csv", *fill], out))
    out = material.fresh_output("cal_acc")
    plots = ["--plot_dir", out / "plots"] if data.draw(st.integers(0, 4)) == 0 else []
    ok(run_tool(cal_acc.main, ["--test_file", material.train, "--prediction_file", preds, "--json_file",
                               out / "metrics.json", *plots, *fill], out))


@FUZZ
@given(data=st.data())
def test_fuzz_vote(material, data):
    first, second = _predictions(material, data, "a.jsonl"), _predictions(material, data, "b.jsonl")
    out = material.fresh_output("vote")
    extra = data.draw(st.sampled_from([[], ["--weights", "1,2"], ["--weights", "x"], ["--tie_break", "model:3"],
                                       ["--unanimous_out", out / "u.json"]]))
    ok(run_tool(vote.main, ["--prediction_file", first, "--prediction_file", second, "--test_file", material.train,
                            "--save_path", out / "vote.jsonl", *extra], out))


@FUZZ
@given(data=st.data())
def test_fuzz_analyze_and_merge_cot(material, data):
    reasons = material.root / "r.jsonl"
    reasons.write_bytes(data.draw(jsonl_file(material.reason_rows, REASON_KEYS)))
    out = material.fresh_output("analyze")
    ok(run_tool(analyze.main, ["--input_file", material.train, "--reasons_file", reasons, "--output_dir", out], out))
    out = material.fresh_output("merge", material.converted)
    dataset = out / "mire_train.json"
    if data.draw(st.booleans()):
        source = material.root / "sharegpt.json"
        source.write_bytes(data.draw(sharegpt_json(json.loads(dataset.read_text(encoding="utf-8")))))
        dataset = source
    ok(run_tool(merge_cot.main, ["--dataset_file", dataset, "--reasons_file", reasons, "--output_file",
                                 out / "mire_train_cot.json", "--keep_unexplained"], out))


@FUZZ
@given(data=st.data())
def test_fuzz_distill_input(material, server, data):
    src = material.root / "distill_in.json"
    src.write_bytes(data.draw(mire_json(material.train_rows)))
    out = material.fresh_output("distill_in")
    result = run_tool(distill.main, ["--input_file", src, "--image_dir", material.images, "--base_url", server.url,
                                     "--model", "t", "--mode", data.draw(st.sampled_from(["1", "2"])),
                                     "--output_file", out / "r.jsonl", "--limit", "2", "--max_retries", "0",
                                     "--no_progress"], out)
    ok(result)


@FUZZ
@given(data=st.data())
def test_fuzz_teacher_replies(material, server, data):
    """Any reply body, against the loopback server: every request ends as one reasons line, exit 0 or 3."""
    bodies = [data.draw(teacher_body(material.reply)) for _ in range(3)]
    server.queue(bodies)
    out = material.fresh_output("distill_replies")
    result = run_tool(distill.main, ["--input_file", material.train, "--image_dir", material.images, "--base_url",
                                     server.url, "--model", "t", "--mode", "2", "--output_file", out / "r.jsonl",
                                     "--limit", "3", "--max_retries", "0", "--concurrency", "1", "--no_progress"],
                      out, allowed=(0, 3))
    ok(result)
    lines = [json.loads(x) for x in (out / "r.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 3 and len({x["id"] for x in lines}) == 3
    assert all(x["status"] in ("ok", "refused", "failed") and (x["error"] is None) == (x["status"] == "ok")
               for x in lines)
    assert (result.code == 3) == any(x["status"] == "failed" for x in lines)


@FUZZ
@given(data=st.data())
def test_fuzz_vllm_infer_input_loading(material, data):
    out = material.fresh_output("infer", material.converted)
    target = data.draw(st.sampled_from(["dataset_info.json", "mire_train.json"]))
    content = json.loads((out / target).read_text(encoding="utf-8"))
    strategy = dataset_info_json(content, "mire_train") if target == "dataset_info.json" else sharegpt_json(content)
    (out / target).write_bytes(data.draw(strategy))
    shard = out / "preds.shard-0-of-1.jsonl"
    shard.write_text("".join(json.dumps({"id": r["id"], "predict": r["output"]}, ensure_ascii=False) + "\n"
                             for r in material.train_rows), encoding="utf-8")
    ok(run_tool(vllm_infer.main, ["--dataset", "mire_train", "--dataset_dir", out, "--save_name", out / "preds.jsonl",
                                  "--merge_shards", "--num_shards", "1"], out))
