"""The competition's rules (WWW2025 MIRE), in one place: the tools enforce them by default, and each tool that does
has `--no_competition_limits` to lift them for experiments.

- At most MAX_NEW_TOKENS output tokens per sample: tools.vllm_infer's --max_new_tokens, the answers tools.merge_cot
  writes (the whole assistant turn), the F1 callback's generation during training.
- At most MAX_MODEL_CALLS model calls per sample: tools.vllm_infer makes one; tools.vote combines at most this many
  prediction files (each one model's call per sample).
- A model of fewer than MAX_PARAMETERS parameters: tools.vllm_infer counts the weights' shapes before loading them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .io import MireInputError, problem

MAX_NEW_TOKENS = 100
MAX_MODEL_CALLS = 3
MAX_PARAMETERS = 10_000_000_000  # the model must have fewer
LIFT_FLAG = "--no_competition_limits"


def _refuse(message: str) -> MireInputError:
    return MireInputError(f"{message}; pass {LIFT_FLAG} to allow it")


def check_new_tokens(n: int, flag: str = "--max_new_tokens") -> None:
    if n > MAX_NEW_TOKENS:
        raise _refuse(f"{flag} {n} exceeds the competition limit of {MAX_NEW_TOKENS} output tokens per sample")


def check_model_calls(n: int, what: str) -> None:
    if n > MAX_MODEL_CALLS:
        raise _refuse(f"{what}: {n} model calls per sample exceed the competition limit of {MAX_MODEL_CALLS}")


def check_parameters(n: int, model: str) -> None:
    if n >= MAX_PARAMETERS:
        raise _refuse(f"{model}: {n / 1e9:.2f}B parameters; the competition allows fewer than "
                      f"{MAX_PARAMETERS / 1e9:.0f}B")


def count_parameters(*model_dirs: str | os.PathLike | None) -> int | None:
    """Parameters in the safetensors files of local model (and adapter) directories, from the files' headers
    (nothing is loaded); None when one of them holds none (a hub name, .bin weights): then nothing can be said.
    Quantized weights are counted as stored (packed), which undercounts them."""
    from safetensors import SafetensorError, safe_open

    total = 0
    for model_dir in filter(None, model_dirs):
        files = sorted(Path(model_dir).glob("*.safetensors")) if Path(model_dir).is_dir() else []
        if not files:
            return None
        for path in files:
            try:
                with safe_open(path, framework="numpy") as weights:
                    total += sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
            except SafetensorError as exc:
                raise MireInputError(problem(path, None, None, f"not a readable safetensors file ({exc})")) from None
    return total
