"""Build a Qwen2-VL checkpoint with the real Qwen2 tokenizer, offline: random weights, or (preset real-0.5b) the real
Qwen2.5-Coder-0.5B-Instruct language model of a GGUF file (benchmarks/quality/fetch_gguf.py) with a small random
vision tower.

python -m tools.make_tiny_model --out DIR [--preset tiny|demo|2b|7b] [--seed N] [--device cpu|cuda]
python -m tools.make_tiny_model --out DIR --preset real-0.5b --gguf .real_models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
"""

from __future__ import annotations

import argparse
import time

from mire_factory.io import run_cli
from mire_factory.tiny_model import PRESETS, make_tiny_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--gguf", help="real-* presets: the GGUF file whose language model goes in (needs `gguf`)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where to initialise the weights (cuda is much faster for 7b)")
    args = parser.parse_args(argv)
    if PRESETS[args.preset].from_gguf != bool(args.gguf):
        parser.error(f"--preset {args.preset} {'needs' if PRESETS[args.preset].from_gguf else 'takes no'} --gguf")
    start = time.perf_counter()
    out = make_tiny_model(args.out, preset=args.preset, seed=args.seed, device=args.device, gguf=args.gguf)
    print(f"built {args.preset} Qwen2-VL at {out} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    run_cli(main)
