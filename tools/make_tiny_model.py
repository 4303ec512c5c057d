"""Build a Qwen2-VL checkpoint with the real Qwen2 tokenizer, offline: random weights, or (preset real-0.5b) the real
Qwen2.5-Coder-0.5B-Instruct language model of a GGUF file (benchmarks/quality/fetch_gguf.py) with a small random
vision tower.

python -m tools.make_tiny_model --out DIR [--preset tiny|demo|2b|7b] [--seed N] [--device cpu|cuda] [--num_hidden_layers N]
python -m tools.make_tiny_model --out DIR --preset real-0.5b --gguf .real_models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from mire_factory.hparams import config_field, parse_args
from mire_factory.io import run_cli
from mire_factory.tiny_model import PRESETS, make_tiny_model


@dataclass(kw_only=True)
class TinyModelArguments:
    out: str = field(metadata={"help": "the model directory to write"})
    preset: str = field(default="tiny", metadata={"help": "model size", "choices": sorted(PRESETS)})
    gguf: str | None = field(default=None, metadata={
        "help": "real-* presets: the GGUF file whose language model goes in (needs `gguf`)"})
    seed: int = field(default=0, metadata={"help": "seed of the random weights"})
    device: str = field(default="cpu", metadata={
        "help": "where to initialise the weights (cuda is much faster for 7b)"})
    num_hidden_layers: int | None = field(default=None, metadata={
        "help": "random presets: this many language-model layers instead of the preset's, every width kept (a 7b "
                "that fits an 80 GB GPU, for timing what does not depend on depth)"})
    config: str | None = config_field()

    def __post_init__(self):
        if PRESETS[self.preset].from_gguf != bool(self.gguf):
            raise ValueError(f"--preset {self.preset} {'needs' if PRESETS[self.preset].from_gguf else 'takes no'} "
                             "--gguf")
        if self.num_hidden_layers is not None and (self.num_hidden_layers < 1 or self.gguf):
            raise ValueError(f"--num_hidden_layers {self.num_hidden_layers}: give 1 or more, with a preset of random "
                             "weights")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(TinyModelArguments, argv, __doc__)
    start = time.perf_counter()
    out = make_tiny_model(args.out, preset=args.preset, seed=args.seed, device=args.device, gguf=args.gguf,
                          num_hidden_layers=args.num_hidden_layers)
    depth = f" with {args.num_hidden_layers} language-model layers" if args.num_hidden_layers else ""
    print(f"built {args.preset} Qwen2-VL{depth} at {out} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    run_cli(main)
