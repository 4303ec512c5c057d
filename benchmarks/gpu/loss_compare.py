"""The same training with different optimizer settings, loss per optimizer step side by side (issue 20).

python benchmarks/gpu/loss_compare.py --out DIR [--steps 100] --variant NAME=OVERRIDES [--variant ...] \
    CONFIG.yaml [key=value ...]

Each variant is one `python -m mire_factory.train CONFIG [key=value ...] OVERRIDES` run, one after the other (each in
its own process, so each starts with an empty GPU), with the same data, seed and number of steps, a loss logged at
every optimizer step, no evaluation and no checkpoint (the final model LLaMA-Factory saves is deleted after the run).
OVERRIDES are space-separated key=value pairs (empty: the config as it is). The first variant is the reference.

Writes DIR/NAME/ (the run's trainer_state.json) and DIR/NAME.log (its whole output) for each variant, and DIR/loss_compare.json:
per variant the per-step losses and grad norms, the optimizer line of mire_factory.train (which optimizer, state types
and parameter dtypes ran), and against the reference the max and mean absolute loss difference per step and the
same for the losses smoothed over 10 steps (step-to-step batch noise averaged out); DIR/loss_compare.png draws the
curves. Exit 1 when a run failed or logged fewer steps than asked, 2 on a malformed --variant.

python benchmarks/gpu/loss_compare.py --out DIR --merge A/loss_compare.json B/loss_compare.json [...]

Runs of the same comparison made in separate calls (a lent GPU machine is released between them) compared as one:
every run of the files in order, the first file's reference first; writes DIR/loss_compare.json and its plot, runs
nothing. Exit 2 when a file is missing or unreadable, or two files hold a run of the same name.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mire_factory.io import MireInputError, problem, run_cli, write_json_atomic  # noqa: E402

SMOOTH = 10
# what every run shares, whatever the config and the command line say: a loss at every step, nothing else
FIXED = ["logging_steps=1", "eval_strategy='no'", "save_strategy='no'", "plot_loss=false", "overwrite_output_dir=true",
         "report_to=none"]
# not anchored at a line's start: on a terminal-less GPU run tqdm's bar precedes it on the same line (2026-12-04)
OPTIMIZER_LINE = re.compile(r"mire_factory\.train: (optimizer .*)$", re.MULTILINE)


def parse_variant(spec: str) -> tuple[str, list[str]]:
    name, sep, rest = spec.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise MireInputError(problem("--variant", None, spec, "expected NAME=OVERRIDES, NAME of letters, digits, "
                                     "'_', '-', '.' (OVERRIDES may be empty)"))
    overrides = shlex.split(rest)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise MireInputError(problem("--variant", None, name, f"override must be key=value, got {bad[0]!r}"))
    return name, overrides


def smoothed(values: list[float], window: int = SMOOTH) -> list[float]:
    """Trailing mean over up to `window` steps."""
    return [sum(values[max(0, i - window + 1): i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def abs_diff(a: list[float], b: list[float]) -> dict:
    d = [abs(x - y) for x, y in zip(a, b, strict=True)]
    return {"max_abs": max(d), "mean_abs": sum(d) / len(d)}


def read_losses(run_dir: Path) -> tuple[list[int], list[float], list[float]]:
    path = run_dir / "trainer_state.json"
    if not path.is_file():
        return [], [], []
    history = json.loads(path.read_text(encoding="utf-8"))["log_history"]
    rows = [h for h in history if "loss" in h and "step" in h]
    return [h["step"] for h in rows], [float(h["loss"]) for h in rows], [float(h.get("grad_norm", "nan")) for h in rows]


def run_variant(name: str, overrides: list[str], config: str, common: list[str], steps: int, out: Path) -> dict:
    run_dir = out / name
    args = [config, *common, *overrides, *FIXED, f"max_steps={steps}", f"output_dir={run_dir}"]
    log = out / f"{name}.log"
    start = time.perf_counter()
    with log.open("w", encoding="utf-8") as fh:
        rc = subprocess.run([sys.executable, "-m", "mire_factory.train", *args], cwd=REPO, stdout=fh,
                            stderr=subprocess.STDOUT, check=False).returncode
    wall = time.perf_counter() - start
    for weights in run_dir.glob("*.safetensors"):  # the final model: not what is compared, gigabytes at 2B
        weights.unlink()
    step_ids, losses, grad_norms = read_losses(run_dir)
    found = OPTIMIZER_LINE.search(log.read_text(encoding="utf-8", errors="replace"))
    print(f"{name}: rc={rc}, {len(losses)} losses, {wall:.0f} s; {found.group(1) if found else 'no optimizer line'}",
          flush=True)
    return {"overrides": overrides, "rc": rc, "wall_s": wall, "optimizer": found.group(1) if found else None,
            "steps": step_ids, "loss": losses, "grad_norm": grad_norms, "log": str(log)}


def compare(runs: dict[str, dict], steps: int) -> dict:
    names = list(runs)
    ref = runs[names[0]]
    out = {"reference": names[0], "steps": steps, "smooth_window": SMOOTH, "runs": runs, "against_reference": {}}
    for name in names[1:]:
        run = runs[name]
        if len(run["loss"]) != steps or len(ref["loss"]) != steps:
            out["against_reference"][name] = None
            continue
        out["against_reference"][name] = {
            "loss": abs_diff(run["loss"], ref["loss"]),
            f"loss_smoothed{SMOOTH}": abs_diff(smoothed(run["loss"]), smoothed(ref["loss"])),
            "final_loss": {"reference": ref["loss"][-1], name: run["loss"][-1]},
            f"last{SMOOTH}_mean": {"reference": sum(ref["loss"][-SMOOTH:]) / len(ref["loss"][-SMOOTH:]),
                                   name: sum(run["loss"][-SMOOTH:]) / len(run["loss"][-SMOOTH:])},
        }
    return out


def merged_runs(paths: list[str]) -> tuple[dict[str, dict], int]:
    """The runs of several loss_compare.json files, in order, and their steps; one line naming the file otherwise."""
    runs: dict[str, dict] = {}
    steps = None
    for path in paths:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            file_runs, file_steps = data["runs"], int(data["steps"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise MireInputError(problem(path, None, None, f"not a readable loss_compare.json ({exc})")) from None
        if not isinstance(file_runs, dict):
            raise MireInputError(problem(path, None, "runs", "expected an object of runs by name"))
        for name, run in file_runs.items():
            if not (isinstance(run, dict) and isinstance(run.get("loss"), list) and isinstance(run.get("steps"), list)
                    and len(run["loss"]) == len(run["steps"])):
                raise MireInputError(problem(path, None, f"runs.{name}", "expected 'steps' and 'loss' lists of one "
                                                                          "length"))
            if name in runs:
                raise MireInputError(problem(path, None, "runs", f"a run named {name!r} is already in an earlier file"))
            runs[name] = run
        steps = file_steps if steps is None else min(steps, file_steps)
    return runs, steps


def report(result: dict, out: Path, title: str) -> None:
    write_json_atomic(out / "loss_compare.json", result)
    for name, diff in result["against_reference"].items():
        print(f"{name} vs {result['reference']}: " + (json.dumps({k: diff[k] for k in ("loss", f"loss_smoothed{SMOOTH}")})
                                                    if diff else "not compared (a run failed or logged fewer steps)"))
    curves = {name: list(zip(r["steps"], r["loss"], strict=True)) for name, r in result["runs"].items() if r["loss"]}
    if curves:
        from mire_factory.plots import plot_loss_curves

        plot_loss_curves(curves, out / "loss_compare.png", title=title)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--variant", action="append", default=[], help="NAME=OVERRIDES (the first: reference)")
    parser.add_argument("--merge", nargs="+", metavar="LOSS_COMPARE_JSON",
                        help="compare the runs of these files instead of running (the first file's reference first)")
    parser.add_argument("config", nargs="?")
    parser.add_argument("overrides", nargs="*")
    ns = parser.parse_args(argv)
    if ns.merge:
        if ns.variant or ns.config:
            raise MireInputError(problem("--merge", None, None, "runs nothing: give no --variant and no config"))
        runs, steps = merged_runs(ns.merge)
        out = Path(ns.out)
        out.mkdir(parents=True, exist_ok=True)
        result = compare(runs, steps)
        result.update(merged_from=ns.merge)
        report(result, out, "training loss per optimizer step")
        return 0
    if not ns.variant or not ns.config:
        raise MireInputError(problem("--variant", None, None, "needs at least one --variant and a config"))
    variants = [parse_variant(v) for v in ns.variant]
    names = [n for n, _ in variants]
    if len(set(names)) != len(names):
        raise MireInputError(problem("--variant", None, None, f"variant names repeat: {names}"))
    if ns.steps < 1:
        raise MireInputError(problem("--steps", None, None, f"must be at least 1, got {ns.steps}"))
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {name: run_variant(name, overrides, ns.config, ns.overrides, ns.steps, out) for name, overrides in variants}
    result = compare(runs, ns.steps)
    result.update(config=ns.config, common_overrides=ns.overrides)
    report(result, out, f"{Path(ns.config).name}: training loss per optimizer step")
    bad = [n for n, r in runs.items() if r["rc"] != 0 or len(r["loss"]) != ns.steps
           or not all(math.isfinite(x) for x in r["loss"])]
    if bad:
        print(f"error: runs failed, logged fewer than {ns.steps} losses or a non-finite loss: {', '.join(bad)} "
              f"(see {out}/NAME.log)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_cli(main)
