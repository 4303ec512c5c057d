"""BENCHMARKS.md's training rows from train_bench.py results, with the ratio to a baseline run.

python benchmarks/gpu/training_table.py RESULT.json [RESULT.json ...] [--baseline LABEL] [--record_tokens 1174.34]

A packed run (train_bench's tokens_counted "all": neat_packing) counts packed sequences as samples; its
records/s is its tokens/s divided by an unpacked record's tokens (--record_tokens, by default the unpacked runs' own
mean), which is what compares with the other runs and with the baseline.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mire_factory.io import MireInputError, problem, read_json, run_cli  # noqa: E402

FIELDS = ("label", "samples_per_s", "tokens_per_s", "tokens_per_sample", "peak_gpu_mem_gib", "mfu")


def is_packed(result: dict) -> bool:
    return result.get("tokens_counted") == "all"  # train_bench counts all input ids for packed runs only


def load(path: str) -> dict:
    result = read_json(path)
    if not isinstance(result, dict):
        raise MireInputError(problem(path, None, None, "expected a train_bench.py result (a JSON object)"))
    for field in FIELDS:
        if field not in result:
            raise MireInputError(problem(path, result.get("label"), field, "missing: not a train_bench.py result"))
    return result


def records_per_s(result: dict, record_tokens: float) -> float:
    return result["tokens_per_s"] / record_tokens if is_packed(result) else result["samples_per_s"]["mean"]


def table(results: list[dict], baseline: str | None, record_tokens: float) -> str:
    base = next((r for r in results if r["label"] == baseline), None)
    rows = ["| Run | samples/s min / median / max (mean) | records/s | tokens/s | peak GPU mem | MFU | vs "
            f"{baseline or '-'} |", "|---|---|---|---|---|---|---|"]
    for r in results:
        sps, rps = r["samples_per_s"], records_per_s(r, record_tokens)
        ratio = f"{rps / records_per_s(base, record_tokens):.2f}x" if base else ""
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else ""
        rows.append(f"| `{r['label']}`{' (packed)' if is_packed(r) else ''} | {sps['min']:.2f} / {sps['median']:.2f} / "
                    f"{sps['max']:.2f} ({sps['mean']:.2f}) | {rps:.2f} | {r['tokens_per_s']:.0f} | "
                    f"{r['peak_gpu_mem_gib']:.1f} GiB | {mfu} | {ratio} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+")
    parser.add_argument("--baseline", help="the label of the run the ratios are taken against")
    parser.add_argument("--record_tokens", type=float, help="tokens of an unpacked record (packed runs' records/s)")
    ns = parser.parse_args(argv)
    results = [load(p) for p in ns.results]
    if ns.baseline and ns.baseline not in [r["label"] for r in results]:
        raise MireInputError(problem("--baseline", None, None,
                                     f"no result is labelled {ns.baseline!r}: {[r['label'] for r in results]}"))
    unpacked = [r["tokens_per_sample"] for r in results if not is_packed(r)]
    record_tokens = ns.record_tokens or (sum(unpacked) / len(unpacked) if unpacked else None)
    if record_tokens is None and any(is_packed(r) for r in results):
        raise MireInputError(problem("--record_tokens", None, None,
                                     "needed: every run is packed, so no unpacked run gives a record's tokens"))
    print(table(results, ns.baseline, record_tokens or 1.0))
    return 0


if __name__ == "__main__":
    run_cli(main)
