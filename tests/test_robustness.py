"""Nothing lost, no traceback (issue 15): refused outputs, odd teacher replies, secrets, atomic output sets, locks,
exit codes and messages. Tools run in-process through run_cli, as a user's `python -m tools.X` would."""

from __future__ import annotations

import json
import multiprocessing
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from fault_server import RunningServer

from conftest import REPO
from mire_factory.dataset_info import read_dataset_info, register
from mire_factory.distill import reason_from_response
from mire_factory.infer.output import PredictionsLog
from mire_factory.io import TMP_SUFFIX, MireInputError, output_lock, run_cli
from mire_factory.records import load_records
from mire_factory.sharegpt import sharegpt_entry
from mire_factory.synthetic import make_records, write_dataset
from tools import analyze, cal_acc, convert, convert2submit, distill, merge_cot, validate, vllm_infer, vote

SECRET = "sk-MIRE-ROBUST-7c1d2e3f4a5b6c7d8e9f"
FAST = ["--timeout", "5", "--no_progress"]


def call(main, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a tool run in-process; a traceback would propagate out of here."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as info:
        run_cli(main, [str(a) for a in args])
    return info.value.code or 0, out.getvalue(), err.getvalue()


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root (hidden ones too) with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("robust")
    images = root / "images"
    write_dataset(root / "train.json", make_records(40, 40, images, seed=3, max_dialogue_images=1))
    write_dataset(root / "test.json", make_records(4, 4, images, seed=4, max_dialogue_images=1, with_labels=False,
                                                   id_prefix="t"))
    write_dataset(root / "text.json", make_records(0, 6, images, seed=5, max_dialogue_images=0, id_prefix="x"))
    return {"root": root, "train": root / "train.json", "test": root / "test.json", "text": root / "text.json",
            "images": images}


def converted(data, out: Path, *extra) -> Path:
    code, _, err = call(convert.main, "--input_file", data["train"], "--image_dir", data["images"], "--output_dir", out,
                        *extra)
    assert code == 0, err
    return out


# ---------------------------------------------------------------- distill


def distill_args(data, url, out, *extra):
    return ["--input_file", data["text"], "--image_dir", data["images"], "--base_url", url, "--model", "teacher",
            "--output_file", out, "--mode", "2", *FAST, *map(str, extra)]


@pytest.mark.parametrize("content", ["train", "jsonl", "cut"])
def test_distill_refuses_an_output_file_that_is_not_a_reasons_file(data, tmp_path, content):
    target = tmp_path / "target"
    target.write_bytes({
        "train": data["train"].read_bytes().rstrip(b"\n"),  # issue 15: this was "repaired" away
        "jsonl": b'{"id": "a", "predict": "x"}\n',
        "cut": b'{"id": "a", "mode": 1, "model": "m", "status": "ok"}\n[{"instruction": ',
    }[content])
    before = tree(tmp_path)
    code, _, err = call(distill.main, *distill_args(data, "http://127.0.0.1:9/v1", target))
    assert code == 2 and "not a reasons file of tools.distill" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert tree(tmp_path) == before  # not one byte changed, not even a lock file beside it


def test_distill_appends_to_an_empty_file_and_exits_3_when_the_server_is_down(data, tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_bytes(b"")
    code, stdout, err = call(distill.main, *distill_args(data, "http://127.0.0.1:9/v1", out, "--max_retries", "0"))
    assert code == 3, err
    assert "6 of 6 requests of this run failed" in err and "--retry_failed" in err and "connection error" in err
    lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [x["status"] for x in lines] == ["failed"] * 6
    code, stdout, err = call(distill.main, *distill_args(data, "http://127.0.0.1:9/v1", out))
    assert code == 3 and "6 failed in an earlier run and were not asked again" in err


ODD = {
    "odd_choices": ("failed", "malformed response (choices[0] is a JSON str"),
    "odd_content": ("failed", "malformed response ("),  # a number, or a list of numbers
    "odd_body": ("failed", "malformed response (the body is a JSON list"),
    "odd_refusal": ("refused", "refusal: true"),
    "odd_usage": ("ok", None),
}


@pytest.mark.parametrize("fault", list(ODD))
def test_an_odd_reply_becomes_a_line_not_a_traceback(data, tmp_path, fault):
    out = tmp_path / "r.jsonl"
    with RunningServer("--fault_rate", "1", "--faults", fault) as server:
        code, _, err = call(distill.main, *distill_args(data, server.url, out, "--max_retries", "1",
                                                        "--concurrency", "6"))  # one wave of the retry's wait
    status, error = ODD[fault]
    lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 6 and {x["status"] for x in lines} == {status}, lines[0]
    assert code == (3 if status == "failed" else 0), err
    assert "Traceback" not in err
    for line in lines:
        assert (line["error"] or "").startswith(error) if error else line["error"] is None
        assert line["usage"] == {} if fault == "odd_usage" else True


@pytest.mark.parametrize("body", [
    {"choices": ["x"]}, {"choices": [{"message": {"content": 5}}]}, {"choices": [{"message": "hi"}]},
    {"choices": [{"message": {"content": [1]}}]}, [1], "x", None, {"choices": {}},
    {"choices": [{"message": {"content": '{"理由": "r", "所属类别": "x"}'}, "finish_reason": 7}], "usage": "abc"},
    {"choices": [{"message": {"content": None, "refusal": {"a": 1}}}]},
    {"choices": [{"message": {"content": '{"理由": ' + "[" * 100_000 + "}"}}]},
])
def test_reason_from_response_takes_any_body(data, body):
    rec = load_records(data["text"], data["images"])[0]
    line = reason_from_response(body, rec, 2, "m")
    assert line.status in ("ok", "refused", "failed")
    assert (line.error is None) == (line.status == "ok")


def test_the_key_is_scrubbed_from_every_field(data, tmp_path, monkeypatch):
    out = tmp_path / "r.jsonl"
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with RunningServer("--echo_key", env={"FAULT_SERVER_API_KEY": SECRET}) as server:
        code, stdout, err = call(distill.main, *distill_args(data, server.url, out, "--mode", "1"))
    text = out.read_text(encoding="utf-8")
    assert code in (0, 3), err
    assert SECRET not in text + stdout + err
    lines = [json.loads(x) for x in text.splitlines()]
    assert all("***" in (x["reason"] or "") for x in lines if x["status"] == "ok")  # the echo was there
    assert any("***" in (x["label"] or "") for x in lines)  # half of them in the label too


def test_a_second_distill_on_the_same_file_is_refused(data, tmp_path):
    out = tmp_path / "r.jsonl"
    with output_lock(out):
        code, _, err = call(distill.main, *distill_args(data, "http://127.0.0.1:9/v1", out))
    assert code == 2 and "another tools.distill is writing it" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_an_output_where_no_lock_can_be_made_is_said_so_not_blamed_on_another_run(data):
    """filelock reports a lock file it cannot create as a timeout; the line says what happened instead."""
    code, _, err = call(distill.main, *distill_args(data, "http://127.0.0.1:9/v1", "/proc/mire-r.jsonl"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: /proc/mire-r.jsonl: cannot lock it (") and "writing it" not in err


# ---------------------------------------------------------------- convert


def test_convert_with_a_directory_where_a_file_goes_changes_nothing(data, tmp_path):
    out = converted(data, tmp_path / "o")
    (out / "mire_val.json").unlink()
    (out / "mire_val.json").mkdir()
    before = tree(out)
    code, _, err = call(convert.main, "--input_file", data["train"], "--image_dir", data["images"], "--output_dir",
                        out, "--seed", "7")
    assert code == 2 and "mire_val.json: is a directory" in err and "Traceback" not in err
    assert tree(out) == before


def test_convert_val_size_0_removes_the_old_val_split_and_keeps_the_test_split(data, tmp_path):
    out = converted(data, tmp_path / "o")
    code, _, err = call(convert.main, "--input_file", data["test"], "--image_dir", data["images"], "--output_dir", out)
    assert code == 0, err
    assert set(read_dataset_info(out)) == {"mire_train", "mire_val", "mire_test"}
    code, stdout, _ = call(convert.main, "--input_file", data["train"], "--image_dir", data["images"], "--output_dir",
                           out, "--val_size", "0")
    assert code == 0 and "removed mire_val" in stdout
    assert set(read_dataset_info(out)) == {"mire_train", "mire_test"}
    assert not (out / "mire_val.json").exists() and (out / "mire_test.json").is_file()


def test_outputs_are_written_0644_under_the_umask(data, tmp_path):
    old = os.umask(0o022)
    try:
        out = converted(data, tmp_path / "o")
    finally:
        os.umask(old)
    for name in ("mire_train.json", "mire_val.json", "dataset_info.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name


def test_stale_temp_files_of_a_killed_run_are_cleaned_and_only_ours(data, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out / f".mire_train.json.{dead.stdout.strip()}.0badc0de{TMP_SUFFIX}"
    stale.write_bytes(b"x" * 1000)
    live = out / f".mire_train.json.{os.getpid()}.0badc0de{TMP_SUFFIX}"  # a live writer's: kept
    live.write_bytes(b"y")
    foreign = out / ".mire_train.json.tmp"  # someone else's hidden file: kept
    foreign.write_bytes(b"z")
    converted(data, out)
    assert not stale.exists() and live.exists() and foreign.exists()
    assert not [p for p in out.iterdir() if p.name.endswith(TMP_SUFFIX) and p != live]


def _register_many(args):
    folder, worker = args
    for k in range(15):
        register(folder, {f"w{worker}_{k}": sharegpt_entry(f"w{worker}_{k}.json")})


def test_concurrent_registrations_lose_nothing(tmp_path):
    with multiprocessing.get_context("fork").Pool(6) as pool:
        pool.map(_register_many, [(tmp_path, w) for w in range(6)])
    assert len(read_dataset_info(tmp_path)) == 6 * 15


def test_concurrent_converts_of_two_tasks_keep_both_registrations(data, tmp_path):
    cmd = [sys.executable, "-m", "tools.convert", "--input_file", str(data["train"]), "--image_dir",
           str(data["images"]), "--output_dir", str(tmp_path)]
    procs = [subprocess.Popen([*cmd, "--task", task], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for task in ("image", "dialogue")]
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    assert set(read_dataset_info(tmp_path)) == {"mire_image_train", "mire_image_val", "mire_dialogue_train",
                                                "mire_dialogue_val"}


def test_a_second_convert_of_the_same_split_is_refused(data, tmp_path):
    with output_lock(tmp_path / "mire_train"):
        code, _, err = call(convert.main, "--input_file", data["train"], "--image_dir", data["images"],
                            "--output_dir", tmp_path)
    assert code == 2 and "another tools.convert is writing this split" in err
    assert not (tmp_path / "mire_train.json").exists()


# ---------------------------------------------------------------- scoring, vote, analyze, merge_cot


def predictions(data, path: Path, wrong: bool = False) -> Path:
    records = load_records(data["train"])
    rows = [{"id": r.id, "predict": r.output if not wrong or k % 3 else "不知道"} for k, r in enumerate(records)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_cal_acc_with_a_file_as_plot_dir_keeps_the_old_metrics(data, tmp_path):
    preds = predictions(data, tmp_path / "p.jsonl")
    metrics = tmp_path / "metrics.json"
    metrics.write_text("{}", encoding="utf-8")
    (tmp_path / "plots").write_text("a file", encoding="utf-8")
    before = tree(tmp_path)
    code, _, err = call(cal_acc.main, "--test_file", data["train"], "--prediction_file", preds, "--json_file", metrics,
                        "--plot_dir", tmp_path / "plots")
    assert code == 2 and "plots is a file, not a directory" in err
    assert tree(tmp_path) == before


def test_vote_with_a_bad_unanimous_out_keeps_the_old_vote(data, tmp_path):
    p1, p2 = predictions(data, tmp_path / "a.jsonl"), predictions(data, tmp_path / "b.jsonl", wrong=True)
    (tmp_path / "vote.jsonl").write_text("old\n", encoding="utf-8")
    (tmp_path / "u.json").mkdir()
    before = tree(tmp_path)
    code, _, err = call(vote.main, "--prediction_file", p1, "--prediction_file", p2, "--test_file", data["train"],
                        "--save_path", tmp_path / "vote.jsonl", "--unanimous_out", tmp_path / "u.json")
    assert code == 2 and "u.json: is a directory" in err
    assert tree(tmp_path) == before


def reasons_line(rid, **extra) -> str:
    row = {"id": rid, "mode": 2, "model": "t", "status": "ok", "reason": "因为如此。", "label": None, **extra}
    return json.dumps(row, ensure_ascii=False) + "\n"


@pytest.mark.parametrize("field,value", [("label", 5), ("reason", ["x"]), ("usage", "abc"), ("mode", True)])
def test_analyze_and_merge_cot_refuse_a_reasons_line_of_the_wrong_type(data, tmp_path, field, value):
    records = load_records(data["train"])
    good = "".join(reasons_line(r.id, label=r.output) for r in records[1:])
    bad = tmp_path / "r.jsonl"
    bad.write_text(good + reasons_line(records[0].id, **{field: value}), encoding="utf-8")
    study = tmp_path / "study"
    code, _, err = call(analyze.main, "--input_file", data["train"], "--reasons_file", bad, "--output_dir", study)
    assert code == 2 and f"line {len(records)}: record {records[0].id!r}: field '{field}'" in err
    assert not study.exists()  # no PNG, no report
    out = converted(data, tmp_path / "o", "--val_size", "0", "--prompt_variant", "cot")
    before = tree(out)
    code, _, err = call(merge_cot.main, "--dataset_file", out / "mire_train.json", "--reasons_file", bad,
                        "--output_file", out / "cot.json")
    assert code == 2 and f"field '{field}'" in err and "Traceback" not in err
    assert tree(out) == before


def test_merge_cot_blames_an_empty_reasons_file_and_a_row_without_a_task(data, tmp_path):
    out = converted(data, tmp_path / "o", "--val_size", "0", "--prompt_variant", "cot")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    code, _, err = call(merge_cot.main, "--dataset_file", out / "mire_train.json", "--reasons_file", empty,
                        "--output_file", out / "cot.json")
    assert code == 2 and err.startswith(f"error: {empty}: no reasons lines")
    rows = json.loads((out / "mire_train.json").read_text(encoding="utf-8"))
    rows[0]["messages"][0]["content"] = "随便说点什么"
    (out / "mire_train.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    reasons = tmp_path / "r.jsonl"
    reasons.write_text(reasons_line(rows[0]["id"], label="x"), encoding="utf-8")
    code, _, err = call(merge_cot.main, "--dataset_file", out / "mire_train.json", "--reasons_file", reasons,
                        "--output_file", out / "cot.json")
    assert code == 2 and f"record {rows[0]['id']!r}: field 'messages[0].content': cannot tell the task" in err


# ---------------------------------------------------------------- reading inputs


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("case", ["truncated", "bomb", "bomb_warning", "nul", "directory_input", "deep", "not_utf8",
                                  "unreadable"])
def test_validate_gives_one_line_for_each_bad_input(data, tmp_path, case):
    records = json.loads(data["train"].read_text(encoding="utf-8"))
    first = next(r for r in records if r["image"])
    images = data["images"]
    path = tmp_path / "in.json"
    expected = {
        "truncated": "image file is truncated", "bomb": "DecompressionBombError",
        "bomb_warning": "DecompressionBombWarning", "nul": "holds a NUL character",
        "directory_input": "is a directory, expected a file", "deep": "nested too deeply",
        "not_utf8": "line 1: not UTF-8 text", "unreadable": "cannot read",
    }[case]
    if case in ("truncated", "bomb", "bomb_warning"):
        images = tmp_path / "images"
        images.mkdir()
        for name in {n for r in records for n in r["image"]}:
            (images / name).parent.mkdir(parents=True, exist_ok=True)
            (images / name).write_bytes((data["images"] / name).read_bytes())
        target = images / first["image"][0]
        if case == "truncated":
            target.write_bytes(target.read_bytes()[:-40])
        else:
            target.write_bytes(_png_header(20000, 20000) if case == "bomb" else _png_header(10000, 10000))
    if case == "nul":
        first["image"][0] = "a\x00b.png"
    text = json.dumps(records, ensure_ascii=False)
    if case == "directory_input":
        path.mkdir()
    elif case == "deep":
        path.write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    elif case == "not_utf8":
        path.write_bytes(text.encode("gbk"))
    elif case == "unreadable":
        if os.geteuid() != 0:
            pytest.skip("root reads any file; /proc/self/mem stands in for an unreadable one as root")
        path = Path("/proc/self/mem")
    else:
        path.write_text(text, encoding="utf-8")
    code, _, err = call(validate.main, "--input_file", path, "--image_dir", images, "--verify_images")
    assert code == 2 and expected in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_unwritable_outputs_give_one_line(data, tmp_path):
    blocked = Path("/sys/kernel/mire-unwritable") if os.geteuid() == 0 else tmp_path / "ro"
    if os.geteuid() != 0:
        blocked.mkdir(mode=0o500)
    preds = predictions(data, tmp_path / "p.jsonl")
    runs = [
        (convert.main, "--input_file", data["train"], "--image_dir", data["images"], "--output_dir", blocked),
        (cal_acc.main, "--test_file", data["train"], "--prediction_file", preds, "--json_file", blocked / "m.json"),
        (vote.main, "--prediction_file", preds, "--prediction_file", preds, "--test_file", data["train"],
         "--save_path", blocked / "v.jsonl"),
        (distill.main, *distill_args(data, "http://127.0.0.1:9/v1", blocked / "r.jsonl")),
        (analyze.main, "--input_file", data["train"], "--reasons_file", preds, "--output_dir", blocked),
        (convert2submit.main, "--test_file", data["train"], "--prediction_file", preds, "--save_path",
         blocked / "s.csv"),
        (vllm_infer.main, "--model_name_or_path", tmp_path, "--dataset", "mire_train", "--dataset_dir",
         converted(data, tmp_path / "o"), "--save_name", blocked / "p.jsonl"),
        (merge_cot.main, "--dataset_file", tmp_path / "o" / "mire_train.json", "--reasons_file", tmp_path / "r.jsonl",
         "--output_file", blocked / "cot.json"),
    ]
    (tmp_path / "r.jsonl").write_text("".join(reasons_line(r.id, label=r.output)
                                              for r in load_records(data["train"])), encoding="utf-8")
    for main, *args in runs:
        code, _, err = call(main, *args)
        assert code == 2 and "Traceback" not in err, (main, err)
        assert len(err.strip().splitlines()) >= 1 and err.startswith("error: ")


def test_a_broken_middle_line_of_predictions_names_line_and_record(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "predict": "x"}\n{"id": "b", "predict": "x\n{"id": "c", "predict": "y"}\n',
                    encoding="utf-8")
    with pytest.raises(MireInputError) as info:
        PredictionsLog(path).done()
    assert "line 2: record 'b': not valid JSON" in str(info.value) and "byte" not in str(info.value)


def test_a_second_inference_on_the_same_file_is_refused(data, tmp_path):
    out = converted(data, tmp_path / "o")
    save = tmp_path / "preds.jsonl"
    with output_lock(save):
        code, _, err = call(vllm_infer.main, "--model_name_or_path", tmp_path / "no-model", "--dataset", "mire_val",
                            "--dataset_dir", out, "--save_name", save, "--backend", "hf")
    assert code == 2 and "another tools.vllm_infer is writing it" in err


def test_predictions_that_are_not_utf8_give_one_line(data, tmp_path):
    preds = predictions(data, tmp_path / "p.jsonl")
    preds.write_bytes(preds.read_bytes() + "不\n".encode("gbk"))
    code, _, err = call(cal_acc.main, "--test_file", data["train"], "--prediction_file", preds)
    assert code == 2 and f"line {len(load_records(data['train'])) + 1}: not UTF-8 text" in err
