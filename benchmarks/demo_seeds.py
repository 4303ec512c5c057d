"""The demo's outcome across seeds and training-set sizes: is F1 >= 0.90 a property of the settings or of one seed?

    python -m benchmarks.demo_seeds --seeds 0,1,2 --train_per_task 106,212 --out DIR

Runs mire_factory.demo (every step, as `tools.demo` runs it) once per (train_per_task, seed) in DIR/n{N}_s{S}/,
then prints one row per run (overall, image and dialogue F1, training seconds) and writes DIR/runs.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mire_factory.demo import DemoConfig, run_demo  # noqa: E402
from mire_factory.io import run_cli, write_json_atomic  # noqa: E402


def int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int_list, default=[0, 1, 2])
    parser.add_argument("--train_per_task", type=int_list, default=[212])
    parser.add_argument("--out", required=True)
    ns = parser.parse_args(argv)
    out = Path(ns.out)
    rows = []
    out.mkdir(parents=True, exist_ok=True)  # an unwritable --out fails now, in one line, not after a demo run
    for n in ns.train_per_task:
        for seed in ns.seeds:
            summary = run_demo(DemoConfig(workdir=out / f"n{n}_s{seed}", seed=seed, train_per_task=n))
            state = json.loads((out / f"n{n}_s{seed}" / "saves" / "trainer_state.json").read_text(encoding="utf-8"))
            train_s = next(h["train_runtime"] for h in state["log_history"] if "train_runtime" in h)
            rows.append({"train_per_task": n, "seed": seed, "f1": summary["trained"]["f1"],
                         "image_f1": summary["image"]["f1"], "dialogue_f1": summary["dialogue"]["f1"],
                         "train_runtime_s": train_s, "elapsed_s": summary["elapsed_s"]})
            write_json_atomic(out / "runs.json", rows)
    print(f"{'train/task':>10} {'seed':>4} {'F1':>6} {'image':>6} {'dialogue':>8} {'train s':>7} {'all s':>6}")
    for r in rows:
        print(f"{r['train_per_task']:>10} {r['seed']:>4} {r['f1']:6.3f} {r['image_f1']:6.3f} {r['dialogue_f1']:8.3f} "
              f"{r['train_runtime_s']:7.0f} {r['elapsed_s']:6.0f}")
    return 0


if __name__ == "__main__":
    run_cli(main)
