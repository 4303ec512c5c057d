"""The whole pipeline on an embedded default (synthetic data, a tiny Qwen2-VL), on a laptop CPU.

python -m tools.demo [--workdir DIR] [--seed N]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mire_factory.demo import DemoConfig, run_demo
from mire_factory.hparams import config_field, parse_args
from mire_factory.io import run_cli


@dataclass(kw_only=True)
class DemoArguments:
    workdir: str = field(default="demo_workdir", metadata={"help": "where every artifact goes"})
    seed: int = field(default=0, metadata={"help": "seed of the data, the model and training"})
    config: str | None = config_field()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(DemoArguments, argv, __doc__)
    run_demo(DemoConfig(workdir=Path(args.workdir), seed=args.seed))
    return 0


if __name__ == "__main__":
    run_cli(main)
