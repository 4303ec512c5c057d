"""Distillation throughput against a loopback teacher that answers each request after 200 ms.

python benchmarks/bench_distill.py [--latency 0.2] [--concurrency 1 8 32 64] [--seconds 4] [--out FILE.md]
python benchmarks/bench_distill.py --base_url http://127.0.0.1:8000/v1 --model teacher --input_file labelled.json
    --image_dir images [--mode 3] [--requests 256] [--max_tokens 64] [--concurrency 16 32 64] [--json_out F.json]

Runs mire_factory.distill.run_distill (the code behind tools.distill: request building, the openai async client,
reply parsing, one fsync'd line per answer). Without --base_url: on text-only synthetic records against
tests/fault_server.py in its own process; ideal throughput is concurrency / latency, the target >= 75% of it up to 32
in flight. With --base_url: against that real server (e.g. `vllm serve`), on the first --requests records of a real
MIRE file with their images inline, each concurrency on a fresh output file.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from fault_server import RunningServer  # noqa: E402

from mire_factory.distill import DistillConfig, run_distill  # noqa: E402
from mire_factory.records import load_records  # noqa: E402
from mire_factory.synthetic import make_records, write_dataset  # noqa: E402


def real_server(args) -> None:
    """req/s of run_distill against a real server, with images inline, at each concurrency."""
    import json

    records = load_records(args.input_file, args.image_dir)[: args.requests]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for c in args.concurrency:
            cfg = DistillConfig(base_url=args.base_url, model=args.model, modes=args.mode, concurrency=c,
                                max_tokens=args.max_tokens, max_retries=2, timeout=300.0)
            summary = asyncio.run(run_distill(records, args.image_dir, cfg, Path(tmp) / f"r{c}.jsonl",
                                              progress=False))
            rate = summary.requests / summary.elapsed_s
            rows.append({"concurrency": c, "requests": summary.requests, "seconds": round(summary.elapsed_s, 2),
                         "req_per_s": round(rate, 2), "statuses": dict(summary.statuses),
                         "completion_tokens": summary.completion_tokens, "prompt_tokens": summary.prompt_tokens})
            print(json.dumps(rows[-1]), flush=True)
    result = {"base_url": args.base_url, "model": args.model, "modes": args.mode, "max_tokens": args.max_tokens,
              "records": len(records), "images": sum(len(r.images) for r in records), "runs": rows}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--seconds", type=float, default=4.0, help="ideal duration of each run")
    parser.add_argument("--out", help="also write the table to this markdown file")
    parser.add_argument("--base_url", help="a real OpenAI-compatible server instead of the loopback fake")
    parser.add_argument("--model", default="teacher", help="with --base_url: the served model name")
    parser.add_argument("--input_file", help="with --base_url: a MIRE json with labels (modes 2, 3 need them)")
    parser.add_argument("--image_dir")
    parser.add_argument("--mode", type=int, nargs="+", default=[3], choices=[1, 2, 3])
    parser.add_argument("--requests", type=int, default=256, help="with --base_url: the first N records")
    parser.add_argument("--max_tokens", type=int, default=64, help="with --base_url: longest reply")
    parser.add_argument("--json_out", help="with --base_url: write the figures here")
    args = parser.parse_args()
    if args.base_url:
        real_server(args)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp, RunningServer("--latency", args.latency) as server:
        n_max = max(int(c / args.latency * args.seconds) for c in args.concurrency)
        write_dataset(Path(tmp) / "train.json", make_records(0, n_max, Path(tmp) / "img", seed=0, max_dialogue_images=0))
        records = load_records(Path(tmp) / "train.json", Path(tmp) / "img")
        for c in args.concurrency:
            n = max(10, int(c / args.latency * args.seconds))
            cfg = DistillConfig(base_url=server.url, model=f"bench-{c}", modes=[2], concurrency=c, max_retries=0)
            summary = asyncio.run(run_distill(records[:n], Path(tmp) / "img", cfg, Path(tmp) / f"r{c}.jsonl",
                                              progress=False))
            assert summary.statuses["ok"] == n, summary.statuses
            rate = n / summary.elapsed_s
            ideal = c / args.latency
            rows.append((c, n, summary.elapsed_s, rate, ideal, rate / ideal))
            print(f"concurrency {c:3d}: {n:5d} requests in {summary.elapsed_s:6.2f}s = {rate:7.1f} req/s "
                  f"({rate / ideal:5.1%} of ideal {ideal:.0f})", flush=True)
    seq = rows[0][3] if rows and rows[0][0] == 1 else None
    table = ["| concurrency | requests | seconds | req/s | ideal req/s | of ideal | vs sequential |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for c, n, s, rate, ideal, frac in rows:
        speedup = f"{rate / seq:.1f}x" if seq else "-"
        table.append(f"| {c} | {n} | {s:.2f} | {rate:.1f} | {ideal:.0f} | {frac:.0%} | {speedup} |")
    text = (f"Teacher latency {args.latency * 1000:.0f} ms, loopback, {platform.processor() or platform.machine()}, "
            f"Python {platform.python_version()}\n\n" + "\n".join(table) + "\n")
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
