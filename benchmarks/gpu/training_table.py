"""BENCHMARKS.md's training rows from train_bench.py results, with the ratio to a baseline run.

python benchmarks/gpu/training_table.py RESULT.json [RESULT.json ...] [--baseline LABEL]
    [--pack_stats PACK_STATS.json ...] [--record_tokens 1174.34]

A packed run (neat_packing) counts packed sequences as samples; records/s is what compares with the other runs and
with the baseline. train_bench records it (records_per_s, tokens_counted "real") since 2026-12-04. Earlier packed
results counted every input id of the packs, padding included (tokens_counted "all"): their records/s is packs/s
times the mean records a pack from benchmarks/gpu/pack_stats.py (--pack_stats, matched by pack length), and their
tokens/s and MFU are scaled by the packs' fill; without a matching --pack_stats, tokens/s over an unpacked record's
tokens (--record_tokens, by default the unpacked runs' mean), which counts the padding as records.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from mire_factory.io import MireInputError, problem, read_json, run_cli  # noqa: E402

FIELDS = ("label", "samples_per_s", "tokens_per_s", "tokens_per_sample", "peak_gpu_mem_gib", "mfu")


def is_packed(result: dict) -> bool:
    return result.get("tokens_counted") in ("all", "real")  # train_bench's packed runs only


def load(path: str) -> dict:
    result = read_json(path)
    if not isinstance(result, dict):
        raise MireInputError(problem(path, None, None, "expected a train_bench.py result (a JSON object)"))
    for field in FIELDS:
        if field not in result:
            raise MireInputError(problem(path, result.get("label"), field, "missing: not a train_bench.py result"))
    return result


def matching_stats(result: dict, stats: list[dict]) -> dict | None:
    """The pack statistics of an old packed result (padding counted): the packs of its length."""
    if result.get("tokens_counted") != "all":
        return None
    dataset = run_dataset(result)
    return next((s for s in stats if s["pack_length"] == round(result["tokens_per_sample"])
                 and s.get("dataset") == dataset), None)


def run_dataset(result: dict) -> str | None:
    """The dataset a result trained on: its overrides' over its recipe's."""
    for override in reversed(result.get("overrides", [])):
        if override.startswith("dataset="):
            return override.split("=", 1)[1]
    config = REPO / result.get("config", "")
    return str(yaml.safe_load(config.read_text(encoding="utf-8")).get("dataset")) if config.is_file() else None


def figures(result: dict, record_tokens: float, stats: list[dict]) -> tuple[float, float, float | None]:
    """records/s, real tokens/s, MFU."""
    if "records_per_s" in result:
        return result["records_per_s"], result["tokens_per_s"], result["mfu"]
    if not is_packed(result):
        return result["samples_per_s"]["mean"], result["tokens_per_s"], result["mfu"]
    pack = matching_stats(result, stats)
    if pack is None:
        return result["tokens_per_s"] / record_tokens, result["tokens_per_s"], result["mfu"]
    packs_per_s = result["tokens_per_s"] / pack["pack_length"]
    mfu = result["mfu"] * pack["fill"] if result["mfu"] is not None else None
    return (packs_per_s * pack["records_per_pack"]["mean"], packs_per_s * pack["real_tokens_per_pack"]["mean"], mfu)


def table(results: list[dict], baseline: str | None, record_tokens: float, stats: list[dict]) -> str:
    base = next((r for r in results if r["label"] == baseline), None)
    rows = ["| Run | samples/s min / median / max (mean) | records/s | tokens/s | peak GPU mem | MFU | vs "
            f"{baseline or '-'} |", "|---|---|---|---|---|---|---|"]
    for r in results:
        sps = r["samples_per_s"]
        rps, tps, mfu = figures(r, record_tokens, stats)
        ratio = f"{rps / figures(base, record_tokens, stats)[0]:.2f}x" if base else ""
        mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else ""
        rows.append(f"| `{r['label']}`{' (packed)' if is_packed(r) else ''} | {sps['min']:.2f} / {sps['median']:.2f} / "
                    f"{sps['max']:.2f} ({sps['mean']:.2f}) | {rps:.2f} | {tps:.0f} | "
                    f"{r['peak_gpu_mem_gib']:.1f} GiB | {mfu_text} | {ratio} |")
    return "\n".join(rows)


def load_stats(path: str) -> dict:
    stats = read_json(path)
    for field in ("pack_length", "records_per_pack", "real_tokens_per_pack", "fill"):
        if not isinstance(stats, dict) or field not in stats:
            raise MireInputError(problem(path, None, field, "missing: not a pack_stats.py result"))
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+")
    parser.add_argument("--baseline", help="the label of the run the ratios are taken against")
    parser.add_argument("--pack_stats", nargs="*", default=[],
                        help="pack_stats.py results: records and real tokens a pack of earlier packed runs")
    parser.add_argument("--record_tokens", type=float, help="tokens of an unpacked record (packed runs' records/s)")
    ns = parser.parse_args(argv)
    results = [load(p) for p in ns.results]
    if ns.baseline and ns.baseline not in [r["label"] for r in results]:
        raise MireInputError(problem("--baseline", None, None,
                                     f"no result is labelled {ns.baseline!r}: {[r['label'] for r in results]}"))
    stats = [load_stats(p) for p in ns.pack_stats]
    unpacked = [r["tokens_per_sample"] for r in results if not is_packed(r)]
    record_tokens = ns.record_tokens or (sum(unpacked) / len(unpacked) if unpacked else None)
    unmatched = [r for r in results if r.get("tokens_counted") == "all" and matching_stats(r, stats) is None]
    if record_tokens is None and unmatched:
        raise MireInputError(problem("--record_tokens", None, None,
                                     "needed: every run is packed, so no unpacked run gives a record's tokens"))
    print(table(results, ns.baseline, record_tokens or 1.0, stats))
    return 0


if __name__ == "__main__":
    run_cli(main)
