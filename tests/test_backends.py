"""Generation backends behind one interface (mire_factory/infer/backends.py), picked by name from a registry."""

from __future__ import annotations

import json

import pytest
from test_infer_units import write_sharegpt

from mire_factory.infer import backends
from mire_factory.infer.args import InferArgs
from mire_factory.infer.backends import BACKENDS, Backend, Job, get_backend, register_backend
from mire_factory.io import MireInputError


def test_the_registry_holds_hf_and_vllm_and_picks_the_default():
    from mire_factory.infer.hf_backend import HfBackend
    from mire_factory.infer.vllm_backend import VllmBackend

    assert list(BACKENDS) == ["hf", "vllm"]  # hf first: measured faster on an H200 (BENCHMARKS.md, vLLM)
    assert isinstance(get_backend("hf"), HfBackend) and isinstance(get_backend("vllm"), VllmBackend)
    assert backends.default_backend() == "hf" and get_backend(None).name == "hf"
    with pytest.raises(MireInputError, match="unknown backend 'tpu' \\(registered: hf, vllm\\)"):
        get_backend("tpu")
    with pytest.raises(MireInputError, match="--compile is for the hf backend"):
        get_backend("vllm").check_args(InferArgs(compile=True))
    get_backend("hf").check_args(InferArgs(compile=True))
    assert "choices" in InferArgs.__dataclass_fields__["backend"].metadata  # --backend offers what is registered


class EchoBackend(Backend):
    """Answers every record with its task and prompt length; fails the second record."""

    name = "echo"
    jobs: list[Job] = []

    def generate(self, job: Job) -> None:
        EchoBackend.jobs.append(job)
        for i, record in enumerate(job.records):
            job.write([job.failed(i, "no answer") if i == 1 else job.row(i, f"{record.task}:{len(job.prompt_ids[i])}")])


@pytest.fixture
def echo_registered():
    register_backend("echo", lambda: EchoBackend)
    try:
        yield
    finally:
        del BACKENDS["echo"]


def test_a_registered_backend_runs_through_the_pipeline(echo_registered, tiny_model_dir, tmp_path):
    """A third backend is one class and one register_backend line; the pipeline gives it rendered prompts and
    writes, resumes and orders what it answers."""
    from mire_factory.infer.pipeline import run
    from mire_factory.synthetic import make_records

    records = make_records(2, 2, tmp_path / "src", seed=5, image_size=(64, 64), max_dialogue_images=1)
    ds = write_sharegpt(records, tmp_path / "src", tmp_path / "ds", with_labels=False)
    save = tmp_path / "p.jsonl"
    args = InferArgs(model_name_or_path=str(tiny_model_dir), dataset="mire_test", dataset_dir=str(ds),
                     save_name=str(save), backend="echo", cutoff_len=1024, image_max_pixels=65536)
    run(args)
    rows = [json.loads(line) for line in save.read_text(encoding="utf-8").splitlines()]
    job = EchoBackend.jobs[-1]
    assert [r["id"] for r in rows] == [r["id"] for r in records] == [r.id for r in job.records]
    assert rows[0]["predict"] == f"{job.records[0].task}:{len(job.prompt_ids[0])}"
    assert rows[0]["prompt"].startswith("<|im_start|>system") and rows[0]["truncation"]["prompt_tokens"] > 0
    assert rows[1]["error"] == "no answer" and rows[1]["predict"] == ""
    run(args)  # resumed: nothing left to predict
    assert len(EchoBackend.jobs) == 1
