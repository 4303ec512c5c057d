"""The lent-GPU kit's detached starts (benchmarks/quality/run.sh start, benchmarks/gpu/h200_chain.sh start) return
at once even when their caller reads their output through a pipe: on the H200 `run.sh start ... | tail -3` waited
for the whole harness (8 minutes), because the subshell that forked it kept the pipe open. The scripts run as
shipped, in a scratch tree whose benchmarks/quality/run.py is a stand-in that sleeps: the workload, not what is
tested here."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO

SLEEP_S = 8
STAND_IN = f"import time\ntime.sleep({SLEEP_S})\nprint('stand-in harness ran')\n"


@pytest.fixture
def tree(tmp_path):
    """A scratch repo root with the real kit scripts, a sleeping run.py, a site with a llamafactory folder, the
    carried split and the GGUF already joined in the stage."""
    root = tmp_path / "repo"
    for rel in ("benchmarks/quality/run.sh", "benchmarks/gpu/h200_chain.sh", "benchmarks/gpu/vllm_session.sh",
                "benchmarks/gpu/chunks.py"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, root / rel)
    (root / "benchmarks/quality/run.py").write_text(STAND_IN)
    for folder in ("mire_factory", "tools", "configs", "tests"):
        (root / folder).mkdir()
    (root / "pyproject.toml").write_text("")
    (root / ".gpu_data/quality").mkdir(parents=True)
    for name in ("train.json", "test.json"):
        (root / ".gpu_data/quality" / name).write_text("[]")
    (tmp_path / "site/llamafactory").mkdir(parents=True)
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf").write_text("")
    (stage / "quality").mkdir()  # the chain runs on a code copy without .gpu_data: the split is staged before
    (stage / "quality/test.json").write_text("[]")
    env = {**os.environ, "STAGE": str(stage), "STAGE_DIR": str(stage), "SITE": str(tmp_path / "site"),
           "HARNESS_SITE": str(tmp_path / "site"), "DEVICE": "cpu", "OUT": str(tmp_path / "out"), "WAIT_S": "1"}
    return root, stage, env


def piped(command: str, root, env) -> tuple[float, str]:
    """Runs command | tail -3 as the chain does; returns its wall time and output."""
    start = time.monotonic()
    done = subprocess.run(["bash", "-c", f"{command} | tail -3"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=4 * SLEEP_S)
    return time.monotonic() - start, done.stdout


def wait_for(path, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return path.read_text()
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {path} after {timeout} s: {path.read_text() if path.exists() else ''}")


def test_run_sh_start_returns_while_the_harness_runs(tree):
    root, stage, env = tree
    took, out = piped("bash benchmarks/quality/run.sh start h", root, env)
    assert took < SLEEP_S / 2, (took, out)
    assert "still running" in out
    log = wait_for(stage / "h.log", "harness-exit 0", 3 * SLEEP_S)
    assert "stand-in harness ran" in log


def test_chain_start_returns_and_its_harness_start_does_not_block_the_chain(tree):
    root, stage, env = tree
    env = {**env, "HARNESS": "h", "SKIP_VLLM": "1"}
    took, out = piped("bash benchmarks/gpu/h200_chain.sh start", root, env)
    assert took < SLEEP_S / 2, (took, out)
    assert "chain started" in out
    chain = stage / "results/chain.txt"
    # the chain's own `run.sh start ... --prepare_only | tail -3` returned while the stand-in still sleeps: the
    # chain reached its next step (waiting for the harness) with no harness-exit yet
    wait_for(chain, "still running", SLEEP_S / 2)
    assert "harness-exit" not in (stage / "h.log").read_text()
    wait_for(chain, "chain-done", 6 * SLEEP_S)  # then training (a second stand-in run) and f1 (fails: no vLLM)
    assert (stage / "h.prev.log").read_text().count("stand-in harness ran") == 1


def test_gpu_run_sh_collects_a_queue_without_installing_over_it(tmp_path):
    """benchmarks/gpu/run.sh wait: reinstalled /tmp/site while the bg: queue it collects was installing it, and the
    two pip runs killed the queue (thirteenth lease). In a tree without .whl, any install attempt fails the call."""
    root = tmp_path / "repo"
    (root / "benchmarks/gpu").mkdir(parents=True)
    shutil.copy(REPO / "benchmarks/gpu/run.sh", root / "benchmarks/gpu/run.sh")
    name = f"nothing_{os.getpid()}_{time.monotonic_ns()}"
    queue_log = Path(f"/tmp/bg_{hashlib.md5((name + chr(10)).encode()).hexdigest()[:12]}.txt")  # the bg: call's
    queue_log.write_text("=== a finished queue\nbg-done\n")
    env = {**os.environ, "OUT": str(tmp_path / "out"), "WAIT_S": "1"}
    try:
        done = subprocess.run(["bash", "benchmarks/gpu/run.sh", f"wait:{name}"], cwd=root, env=env,
                              capture_output=True, text=True, timeout=60)
    finally:
        queue_log.unlink()
    assert "=== a finished queue" in done.stdout, done.stderr  # it went on to collect the queue
    assert "pip" not in done.stderr and ".whl" not in done.stderr
    # a benchmark itself still installs first (and so fails here, with no wheels)
    done = subprocess.run(["bash", "benchmarks/gpu/run.sh", "smoke"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1 and ".whl" in done.stderr
