"""Generation backends behind one small interface, picked by name (LLaMA-Factory's chat engines: BaseEngine,
HuggingfaceEngine, VllmEngine).

The pipeline does everything that must not differ between backends (loading, resuming, truncation plans, prompts
rendered through LLaMA-Factory's template, the output file) and hands a backend a Job: the records still to predict
with their plans and prompt ids. The backend writes one row per record through `job.write` as answers come
(`job.row`, or `job.failed` for a record it could not run).

A new backend: a module with a `Backend` subclass, and a `register_backend` line below naming it (the module is
imported only when chosen, so that a backend's heavy dependencies are not needed by the others).
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..io import MireInputError
from ..records import image_error

if TYPE_CHECKING:
    from ..prompt_variants import PromptVariant
    from .args import InferArgs


def image_failure(exc: BaseException) -> str:
    return f"cannot read an image of the record ({image_error(exc)})"


def failed_row(record, reason: str) -> dict:
    """A record that could not be predicted (its images): kept in the file, so that a rerun does not stall on it,
    and read downstream as an invalid answer."""
    return {"id": record.id, "prompt": "", "predict": "", "label": record.response, "task": record.task,
            "truncation": None, "error": reason}


@dataclass
class Job:
    """What a backend generates: records[i] with plans[i] and prompt_ids[i] (one image-pad token per image)."""

    args: InferArgs
    variant: PromptVariant
    comp: Any  # render.Components: LLaMA-Factory's tokenizer, processor, template and parsed arguments
    records: list
    plans: list
    prompt_ids: list[list[int]]
    write: Callable[[list[dict]], None]  # appends rows to the predictions file

    def row(self, i: int, predict: str) -> dict:
        record, plan = self.records[i], self.plans[i]
        return {"id": record.id, "prompt": self.comp.tokenizer.decode(self.prompt_ids[i], skip_special_tokens=False),
                "predict": predict, "label": record.response, "task": record.task, "truncation": plan.info()}

    def failed(self, i: int, reason: str) -> dict:
        return failed_row(self.records[i], reason)


class Backend(ABC):
    """One way to generate the answers of a Job."""

    name: str

    def check_args(self, args: InferArgs) -> None:  # noqa: B027 - a backend without such settings keeps it
        """Refuses (MireInputError) settings this backend cannot honour, before anything is loaded."""

    @abstractmethod
    def generate(self, job: Job) -> None:
        """Writes one row per record of the job (in any order) through job.write."""


@dataclass
class _Entry:
    load: Callable[[], type[Backend]]
    available: Callable[[], bool]


BACKENDS: dict[str, _Entry] = {}  # in order of preference for the default


def register_backend(name: str, load: Callable[[], type[Backend]], requires: str | None = None) -> None:
    """`load` imports the backend's module and returns its class; `requires` names the package it cannot run
    without (the default backend is the first registered one whose package is installed)."""
    BACKENDS[name] = _Entry(load, lambda: requires is None or importlib.util.find_spec(requires) is not None)


def default_backend() -> str:
    return next(name for name, entry in BACKENDS.items() if entry.available())


def get_backend(name: str | None) -> Backend:
    """The backend registered as `name` (None: the default)."""
    name = name or default_backend()
    if name not in BACKENDS:
        raise MireInputError(f"--backend: unknown backend {name!r} (registered: {', '.join(BACKENDS)})")
    return BACKENDS[name].load()()


def _vllm() -> type[Backend]:
    from .vllm_backend import VllmBackend

    return VllmBackend


def _hf() -> type[Backend]:
    from .hf_backend import HfBackend

    return HfBackend


# hf first, measured: on an H200 (2B Qwen2-VL, 623 real records, 16 new tokens) hf eager did 13.1 samples/s and
# vLLM 0.24.0 5.8 (benchmarks/gpu/results/h200/vllm/); vLLM's multimodal preprocessing runs on the CPU and is not
# hidden behind the GPU. --backend vllm remains for serving and for larger models.
register_backend("hf", _hf)
register_backend("vllm", _vllm, requires="vllm")
