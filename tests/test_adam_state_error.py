"""benchmarks/adam_state_error.py's bad input: one line, exit 2, nothing written (its figures come from a real
0.5B model, minutes a step on the CPU: run by hand, BENCHMARKS.md issue 20)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.parametrize("case", ["no_gguf", "no_data"])
def test_bad_input_is_one_line_exit_2(case, tmp_path):
    gguf = tmp_path / "model.gguf"
    if case == "no_data":
        gguf.write_bytes(b"GGUF")
    data = tmp_path / "missing.json"
    out = tmp_path / "err.json"
    proc = subprocess.run([sys.executable, "benchmarks/adam_state_error.py", "--data", str(data), "--gguf", str(gguf),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[0].startswith(f"error: {gguf if case == 'no_gguf' else data}")
    assert [p.name for p in tmp_path.iterdir()] == (["model.gguf"] if case == "no_data" else [])  # no staged file left
