"""The whole pipeline on an embedded default (synthetic data, a tiny Qwen2-VL), on a laptop CPU.

python -m tools.demo [--workdir DIR] [--seed N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mire_factory.demo import DemoConfig, run_demo
from mire_factory.io import run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="demo_workdir", help="where every artifact goes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    run_demo(DemoConfig(workdir=Path(args.workdir), seed=args.seed))
    return 0


if __name__ == "__main__":
    run_cli(main)
