from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DIR = Path(os.environ.get("MIRE_SAMPLE_DIR", REPO.parent / "shared" / "mire_sample"))


def run_tool(name: str, *args: str, check: bool = False, env: dict | None = None, timeout: int = 600):
    """Runs `python -m tools.NAME ARGS` from the repo root, as a user would."""
    proc = subprocess.run(
        [sys.executable, "-m", f"tools.{name}", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"tools.{name} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def call_tool(name: str, *args) -> subprocess.CompletedProcess:
    """tools.NAME's main through run_cli in this process (what `python -m tools.NAME` runs, without starting an
    interpreter that imports torch and LLaMA-Factory again): its exit code, stdout and stderr, as run_tool gives
    them. For tests that run a tool many times; a traceback propagates out of here."""
    import importlib

    return call_main(importlib.import_module(f"tools.{name}").main, *args)


def call_main(main, *args) -> subprocess.CompletedProcess:
    """call_tool for any main(argv) that its script runs through run_cli (benchmarks/quality's scripts too)."""
    import contextlib
    import io

    from mire_factory.io import run_cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as info:
        run_cli(main, [str(a) for a in args])
    return subprocess.CompletedProcess([main.__module__, *args], info.value.code or 0, out.getvalue(),
                                       err.getvalue())


def convert_ok(*args) -> subprocess.CompletedProcess:
    """tools.convert in this process (call_tool), asserting it succeeded."""
    proc = call_tool("convert", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from mire_factory.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_qwen2_vl"), preset="tiny", seed=0)


@pytest.fixture(scope="session")
def mire_sample() -> Path:
    """../shared/mire_sample: 24 real records and their screenshots (never copied into the project)."""
    if not (SAMPLE_DIR / "train_sample.json").is_file():
        pytest.skip(f"real MIRE sample not present at {SAMPLE_DIR}")
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def synthetic_train(tmp_path_factory) -> tuple[Path, Path]:
    """A small synthetic train file covering every label of both tasks: (json path, image dir)."""
    from mire_factory.synthetic import make_records, write_dataset

    root = tmp_path_factory.mktemp("synthetic")
    records = make_records(46, 46, root / "images", seed=1)
    write_dataset(root / "train.json", records)
    return root / "train.json", root / "images"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def lf_api_server(tiny_model_dir, tmp_path_factory):
    """The real `llamafactory-cli api` (OpenAI-compatible) serving the tiny model on loopback: its base URL."""
    root = tmp_path_factory.mktemp("lf_api")
    config = root / "api.yaml"
    config.write_text(f"model_name_or_path: {tiny_model_dir}\ntemplate: qwen2_vl\ninfer_backend: huggingface\n"
                      "image_max_pixels: 262144\ntrust_remote_code: true\n", encoding="utf-8")
    port = free_port()
    log = open(root / "api.log", "w")
    cli = Path(sys.executable).with_name("llamafactory-cli")
    proc = subprocess.Popen([str(cli), "api", str(config)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "API_HOST": "127.0.0.1", "API_PORT": str(port)})
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 240
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llamafactory-cli api exited: {(root / 'api.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url + "/models", timeout=2).read()
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="session")
def tiny_train_data(tmp_path_factory):
    """8 synthetic records (2 image, 2 dialogue classes) converted with a 25% validation split: short real trainings."""
    from mire_factory.convert import convert
    from mire_factory.synthetic import DEFAULT_IMAGE_CLASSES, make_records, write_dataset
    from mire_factory.taxonomy import DIALOGUE_LABELS

    root = tmp_path_factory.mktemp("tiny_train_data")
    records = make_records(4, 4, root / "images", seed=3, image_classes=DEFAULT_IMAGE_CLASSES[:2],
                           dialogue_classes=DIALOGUE_LABELS[:2], max_dialogue_images=1)
    write_dataset(root / "train.json", records)
    convert(root / "train.json", root / "images", root / "data", val_size=0.25, seed=0)
    return root / "data"
