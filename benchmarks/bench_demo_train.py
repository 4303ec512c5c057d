"""The demo's training step on the CPU with and without transparent huge pages: where its time goes.

    python -m benchmarks.bench_demo_train --what lm_head [--steps 10]       # the 152k-vocab output layer + loss alone
        [--logits full,label] [--dtype bf16|fp32]
    python -m benchmarks.bench_demo_train --what train [--steps 40]         # the demo's training (mire_factory.train)
        [--envs default,glibc,torch,demo] [--logits label,full] [--workdir DIR] [--out rows.json]

`train` runs the demo's own training command (mire_factory.train: its recipe, overrides, data and model) for
--steps steps per setting (since 2026-12-03 with the logits at label positions only, where huge pages no longer
change the training time); `lm_head` times the step's dominant part in one process: bf16 logits over 1400 positions x 151,936 tokens,
the fp32 cross entropy and its backward. Both print wall time, CPU time (user, sys), minor page faults and, for
`train`, the trainer's samples/s. Settings: default (nothing), glibc (GLIBC_TUNABLES=glibc.malloc.hugetlb=1, glibc
>= 2.35), torch (THP_MEM_ALLOC_ENABLE=1, PyTorch's allocator), demo (what mire_factory.demo sets: the glibc switch).
Each step allocates gigabytes of logits; the allocator maps them afresh and the kernel zero-fills them at the first
touch, a fault per 4 KiB page unless huge pages are used. On a shared machine compare sys time and faults, which
other load barely moves, rather than wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mire_factory.demo import (  # noqa: E402
    DemoConfig,
    build_data,
    cpu_train_env,
    train_command,
)

ENVS = {
    "default": {},
    "glibc": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
    "torch": {"THP_MEM_ALLOC_ENABLE": "1"},
    "demo": None,  # mire_factory.demo's CPU_TRAIN_ENV
}
ENV_KEYS = ("GLIBC_TUNABLES", "THP_MEM_ALLOC_ENABLE")

LM_HEAD = """
import resource, time, torch
torch.manual_seed(0)
V, H, T = 151936, 128, 1400
w = torch.nn.Parameter(torch.randn(V, H) * 0.02)
h = torch.randn(T, H, requires_grad=True)
labels = torch.randint(0, V, (T,))
labels[:-20] = -100  # ~5 answer tokens per sample, as in the demo
keep = slice(None) if FULL_LOGITS else labels != -100  # else mire_label_logits_only: label positions alone
def step():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16):
        logits = h[keep] @ w.t()
    torch.nn.functional.cross_entropy(logits.float(), labels[keep], ignore_index=-100).backward()
step()
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(STEPS):
    step()
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(time.perf_counter() - t0, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime, r1.ru_minflt - r0.ru_minflt)
"""


def env_for(name: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    env.update(cpu_train_env() if ENVS[name] is None else {k: v for k, v in cpu_train_env().items()
                                                           if k not in ENV_KEYS})
    env.update(ENVS[name] or {})
    return env


def run_lm_head(name: str, steps: int, logits: str, dtype: str) -> dict:
    code = (LM_HEAD.replace("STEPS", str(steps)).replace("FULL_LOGITS", str(logits == "full"))
            .replace("BF16", str(dtype == "bf16")))
    proc = subprocess.run([sys.executable, "-c", code], env=env_for(name), capture_output=True, text=True, check=True)
    wall, user, sys_s, faults = proc.stdout.split()
    return {"setting": name, "logits": logits, "dtype": dtype, "steps": steps, "wall_s": round(float(wall), 1), "user_s": round(float(user), 1),
            "sys_s": round(float(sys_s), 1), "minor_faults": int(faults)}


def run_one(name: str, cfg: DemoConfig, model_dir: Path, data_dir: Path, steps: int, logits: str) -> dict:
    out = cfg.workdir / f"saves_{name}_{logits}"
    cmd = [f"mire_label_logits_only={str(logits == 'label').lower()}" if a.startswith("mire_label_logits_only=")
           else a for a in train_command(cfg, model_dir, data_dir, out)]
    cmd += [f"max_steps={steps}", "report_to=none", "plot_loss=false"]
    env = env_for(name)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: training failed\n{proc.stderr[-3000:]}")
    results = json.loads((out / "train_results.json").read_text(encoding="utf-8"))
    return {
        "setting": name, "logits": logits, "steps": steps, "wall_s": round(wall, 1),
        "user_s": round(after.ru_utime - before.ru_utime, 1),
        "sys_s": round(after.ru_stime - before.ru_stime, 1),
        "minor_faults": after.ru_minflt - before.ru_minflt,
        "train_runtime_s": round(results["train_runtime"], 1),
        "samples_per_s": round(results["train_samples_per_second"], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", choices=["lm_head", "train"], default="lm_head")
    parser.add_argument("--steps", type=int, help="default: 10 (lm_head), 40 (train)")
    parser.add_argument("--envs", default="default,glibc,torch,demo")
    parser.add_argument("--logits", help="label (mire_label_logits_only), full (every position), or both: "
                        "label,full; default: full (lm_head, as measured before it existed), label (train, the demo's)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="lm_head: the matmul's precision "
                        "(the demo trains in fp32 since 2026-12-03)")
    parser.add_argument("--workdir", help="train: default a temporary directory")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    names = args.envs.split(",")
    unknown = [n for n in names if n not in ENVS]
    if unknown:
        parser.error(f"unknown --envs {unknown}; choose from {list(ENVS)}")
    logits = (args.logits or ("full" if args.what == "lm_head" else "label")).split(",")
    if not set(logits) <= {"label", "full"}:
        parser.error(f"--logits takes label, full or both, got {args.logits!r}")
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    print(f"kernel THP: {thp.read_text().strip() if thp.exists() else 'unknown'}; {os.cpu_count()} cores; "
          f"load average {os.getloadavg()[0]:.1f}")
    rows = []
    if args.what == "lm_head":
        for name in names:
            for kind in logits:
                rows.append(run_lm_head(name, args.steps or 10, kind, args.dtype))
                print(json.dumps(rows[-1]), flush=True)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            from mire_factory.tiny_model import make_tiny_model
            from tools import convert

            cfg = DemoConfig(workdir=Path(args.workdir or tmp).resolve())
            model_dir = make_tiny_model(cfg.workdir / "model", preset="demo", seed=cfg.seed)
            paths = build_data(cfg)
            data_dir = cfg.workdir / "mire"
            convert.main(["--input_file", str(paths["train"]), "--image_dir", str(paths["images"]), "--output_dir",
                          str(data_dir), "--val_size", "0.1", "--seed", str(cfg.seed)])
            for name in names:
                for kind in logits:
                    rows.append(run_one(name, cfg, model_dir, data_dir, args.steps or 40, kind))
                    print(json.dumps(rows[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
