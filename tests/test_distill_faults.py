"""tools.distill against our fault-injecting OpenAI-compatible server on loopback (tests/fault_server.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from fault_server import RunningServer

from conftest import REPO, run_tool
from mire_factory.synthetic import make_records, write_dataset

pytestmark = pytest.mark.slow
FAST = ["--timeout", "1", "--no_progress"]


@pytest.fixture(scope="module")
def text_records(tmp_path_factory) -> tuple[Path, Path]:
    """1,000 text-only dialogue records (no images: these tests are about the transport)."""
    root = tmp_path_factory.mktemp("distill_faults")
    write_dataset(root / "train.json", make_records(0, 1000, root / "images", seed=5, max_dialogue_images=0))
    return root / "train.json", root / "images"


def distill_args(data, url, out, *extra):
    train, images = data
    return ["--input_file", train, "--image_dir", images, "--base_url", url, "--model", "teacher", "--output_file",
            out, *FAST, *map(str, extra)]


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def comparable(rows: list[dict]) -> set[tuple]:
    """A line without what legitimately differs between runs (latency)."""
    return {json.dumps({k: v for k, v in r.items() if k != "latency_s"}, sort_keys=True, ensure_ascii=False)
            for r in rows}


def test_each_fault_is_retried_until_the_answer(text_records, tmp_path):
    out = tmp_path / "r.jsonl"
    # timeout and reset first: they wait the client's backoff, which doubles with each retry (429 and 500 say
    # Retry-After, a malformed reply restarts it)
    script = "timeout,reset,429,500,malformed"
    with RunningServer("--script", script, "--hang", "3") as server:
        proc = run_tool("distill", *distill_args(text_records, server.url, out, "--mode", "2", "--limit", "1",
                                                 "--max_retries", "5", "--concurrency", "1"))
        stats = server.stats()
    assert proc.returncode == 0, proc.stderr
    (line,) = read_lines(out)
    assert line["status"] == "ok" and line["label"] and line["reason"] and line["error"] is None
    assert line["usage"]["total_tokens"] > 0
    for fault in script.split(","):
        assert stats[f"fault_{fault}"] == 1, stats
    assert stats["requests"] == 6 + 1  # five faults, the answer, and our /stats call


def test_retry_after_is_honoured(text_records, tmp_path):
    out = tmp_path / "r.jsonl"
    with RunningServer("--script", "429", "--retry_after", "1.5") as server:
        proc = run_tool("distill", *distill_args(text_records, server.url, out, "--mode", "1", "--limit", "1",
                                                 "--concurrency", "1"))
    assert proc.returncode == 0, proc.stderr
    (line,) = read_lines(out)
    assert line["status"] == "ok"
    assert line["latency_s"] >= 1.5  # the client's backoff alone would have waited 0.5 s at most


def test_spent_retries_and_client_errors_fail_with_their_reason(text_records, tmp_path):
    out = tmp_path / "r.jsonl"
    with RunningServer("--fault_rate", "1", "--faults", "500") as server:
        proc = run_tool("distill", *distill_args(text_records, server.url, out, "--mode", "1", "--limit", "3",
                                                 "--max_retries", "2"))
        assert server.stats()["fault_500"] == 9
    assert proc.returncode == 3, proc.stderr  # finished with failures
    assert "3 of 3 requests of this run failed" in proc.stderr and "--retry_failed" in proc.stderr
    lines = read_lines(out)
    assert [r["status"] for r in lines] == ["failed"] * 3
    assert all(r["error"].startswith("HTTP 500") and "gave up after 3 attempts" in r["error"] for r in lines)
    assert "3 x HTTP 500" in proc.stdout


def test_1000_records_under_30_percent_faults(text_records, tmp_path):
    """Every record ends with exactly one line; every line without an answer says why."""
    out = tmp_path / "r.jsonl"
    with RunningServer("--fault_rate", "0.3", "--permanent", "--hang", "3", "--seed", "1") as server:
        start = time.perf_counter()
        proc = run_tool("distill", *distill_args(text_records, server.url, out, "--mode", "1", "--concurrency", "64",
                                                 "--max_retries", "10"))
        elapsed = time.perf_counter() - start
        stats = server.stats()
    assert proc.returncode == 3, proc.stderr  # the permanent failures (unparseable, HTTP 400) remain
    lines = read_lines(out)
    ids = [r["id"] for r in lines]
    assert len(lines) == 1000 and len(set(ids)) == 1000
    statuses = Counter(r["status"] for r in lines)
    assert statuses["ok"] > 700 and statuses["refused"] > 0 and statuses["failed"] > 0
    for r in lines:
        assert (r["error"] is None) == (r["status"] == "ok"), r
        assert r["gold"] and r["task"] == "dialogue"
    faults = sum(v for k, v in stats.items() if k.startswith("fault_"))
    chat_requests = stats["requests"] - 1
    assert 0.25 < faults / chat_requests < 0.35, stats
    # what is left without an answer is only what the server always does for that prompt; no transient fault
    for r in lines:
        if r["status"] == "refused":
            assert r["error"].startswith(("content_filter", "refusal")), r
        elif r["status"] == "failed":
            assert r["error"].startswith(("unparseable reply", "HTTP 400")), r
            assert r["error"].startswith("HTTP 400") or r["raw"], r  # an unreadable reply is kept raw
    assert not any("gave up" in (r["error"] or "") for r in lines)
    print(f"\n1000 records, {faults} faults injected in {chat_requests} requests: {dict(statuses)} in {elapsed:.1f}s")


def test_sigkill_halfway_then_resume_gives_the_uninterrupted_result(text_records, tmp_path):
    server_args = ("--fault_rate", "0.3", "--permanent", "--hang", "3", "--seed", "2", "--latency", "0.01")
    run = ("--mode", "1", "3", "--limit", "200", "--concurrency", "16", "--max_retries", "12")
    reference, killed = tmp_path / "reference.jsonl", tmp_path / "killed.jsonl"
    with RunningServer(*server_args) as server:
        proc = run_tool("distill", *distill_args(text_records, server.url, reference, *run))
        assert proc.returncode == 3, proc.stderr
        cmd = [sys.executable, "-m", "tools.distill", *map(str, distill_args(text_records, server.url, killed, *run))]
        child = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and child.poll() is None:
            if killed.exists() and killed.read_bytes().count(b"\n") >= 200:
                break
            time.sleep(0.02)
        assert child.poll() is None, "the run finished before it could be killed"
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        half = killed.read_bytes().count(b"\n")
        assert 200 <= half < 400
        proc = run_tool("distill", *distill_args(text_records, server.url, killed, *run))
        assert proc.returncode == 3, proc.stderr
    done_before = sum(r["status"] != "failed" for r in read_lines(killed)[:half])
    assert f"skipped {done_before} already done" in proc.stdout
    ref_lines, resumed = read_lines(reference), read_lines(killed)
    assert len(resumed) == len(ref_lines) == 400
    assert len({(r["id"], r["mode"]) for r in resumed}) == 400
    assert comparable(resumed) == comparable(ref_lines)


def test_retry_failed_replaces_failed_lines(text_records, tmp_path):
    out = tmp_path / "r.jsonl"
    with RunningServer("--fault_rate", "1", "--faults", "500") as broken:
        down = run_tool("distill", *distill_args(text_records, broken.url, out, "--mode", "2", "--limit", "20",
                                                 "--max_retries", "0"))
    assert down.returncode == 3 and "20 of 20 requests of this run failed" in down.stderr
    assert Counter(r["status"] for r in read_lines(out)) == {"failed": 20}
    with RunningServer() as healthy:
        again = run_tool("distill", *distill_args(text_records, healthy.url, out, "--mode", "2", "--limit", "20"))
        assert again.returncode == 3  # nothing asked, and the file still holds 20 failures: said, not hidden
        assert "20 failed before (rerun with --retry_failed)" in again.stdout
        assert "20 failed in an earlier run and were not asked again" in again.stderr
        assert healthy.stats()["requests"] == 1  # nothing asked but /stats
        proc = run_tool("distill", *distill_args(text_records, healthy.url, out, "--mode", "2", "--limit", "20",
                                                 "--retry_failed"), check=True)
    assert "removed 20 failed lines" in proc.stdout
    lines = read_lines(out)
    assert len(lines) == 20 and Counter(r["status"] for r in lines) == {"ok": 20}


def test_api_key_is_sent_but_never_written(text_records, tmp_path):
    secret = "sk-MIRE-TEST-5f3c9a1e7d2b4c6a8e0f"
    out = tmp_path / "r.jsonl"
    with RunningServer("--permanent", env={"FAULT_SERVER_API_KEY": secret}) as server:
        good = run_tool("distill", *distill_args(text_records, server.url, out, "--mode", "1", "--limit", "30"),
                        env={"OPENAI_API_KEY": secret})
        other = run_tool("distill", *distill_args(text_records, server.url, tmp_path / "other.jsonl", "--mode", "1",
                                                  "--limit", "30", "--api_key_env", "MY_TEACHER_KEY"),
                         env={"MY_TEACHER_KEY": secret, "OPENAI_API_KEY": "wrong"})
        wrong = run_tool("distill", *distill_args(text_records, server.url, tmp_path / "wrong.jsonl", "--mode", "1",
                                                  "--limit", "3"), env={"OPENAI_API_KEY": secret + "-not"})
        assert server.stats()["unauthorized"] == 3
    for proc in (good, other):
        assert proc.returncode in (0, 3), proc.stderr  # --permanent: some lines fail for good
    assert wrong.returncode == 3, wrong.stderr
    for proc in (good, other, wrong):
        assert secret not in proc.stdout and secret not in proc.stderr
    assert Counter(r["status"] for r in read_lines(out))["ok"] > 20  # the key reached the server
    assert Counter(r["status"] for r in read_lines(tmp_path / "other.jsonl"))["ok"] > 20
    assert [r["error"].startswith("HTTP 401") for r in read_lines(tmp_path / "wrong.jsonl")] == [True] * 3
    for path in (out, tmp_path / "other.jsonl", tmp_path / "wrong.jsonl"):
        assert secret not in path.read_text(encoding="utf-8")


def test_bad_input_and_dry_run(text_records, tmp_path):
    train, images = text_records
    test_file = tmp_path / "test.json"
    write_dataset(test_file, make_records(0, 2, images, seed=9, max_dialogue_images=0, with_labels=False))
    proc = run_tool("distill", "--input_file", test_file, "--image_dir", images, "--base_url", "http://127.0.0.1:9/v1",
                    "--model", "m", "--mode", "2", "--output_file", tmp_path / "x.jsonl")
    assert proc.returncode == 2
    assert proc.stderr.count("field 'output': modes 2 and 3 need the gold label") == 2
    assert not (tmp_path / "x.jsonl").exists()
    proc = run_tool("distill", "--input_file", train, "--image_dir", images, "--base_url", "http://127.0.0.1:9/v1",
                    "--model", "m", "--mode", "1", "--output_file", tmp_path / "x.jsonl", "--api_key_env", "NOPE_UNSET")
    assert proc.returncode == 2 and "NOPE_UNSET is not set" in proc.stderr
    proc = run_tool("distill", "--input_file", train, "--image_dir", images, "--model", "m", "--mode", "3",
                    "--dry_run", check=True)
    request = json.loads(proc.stdout)
    assert request["model"] == "m" and "不超过100个字" in request["messages"][0]["content"][-1]["text"]
    assert "dry run: 1000 requests" in proc.stderr
