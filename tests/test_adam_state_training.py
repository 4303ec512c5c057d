"""benchmarks/adam_state_training.py's bad input: one line, exit 2, nothing written (its figures come from a real
0.5B model trained on the CPU for about an hour: run by hand, BENCHMARKS.md issue 20)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO
from mire_factory.synthetic import make_records, write_dataset


@pytest.mark.parametrize("case", ["no_gguf", "no_data", "too_few_records", "no_steps"])
def test_bad_input_is_one_line_exit_2(case, tmp_path):
    gguf, data = tmp_path / "model.gguf", tmp_path / "data.json"
    if case != "no_gguf":
        gguf.write_bytes(b"GGUF")
    if case in ("too_few_records", "no_steps"):
        write_dataset(data, make_records(2, 1, tmp_path / "images"))
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "results" / "training.json"
    proc = subprocess.run([sys.executable, "benchmarks/adam_state_training.py", "--data", str(data), "--gguf",
                           str(gguf), "--out", str(out), "--work_dir", str(tmp_path / "work"), "--steps",
                           "0" if case == "no_steps" else "2", "--held_out", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    expected = {"no_gguf": f"error: {gguf}: GGUF file not found", "no_data": f"error: {data}",
                "too_few_records": f"error: {data}: field 'output': 3 labelled records, --steps + --held_out need 4",
                "no_steps": f"error: {out}: field '--steps': must be at least 1"}[case]
    assert lines[0].startswith(expected), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, work folder or lock made
