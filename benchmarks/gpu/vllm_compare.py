"""The four-way inference comparison of issue 22 from benchmarks.bench_infer's and benchmarks.bench_vllm's JSON.

python benchmarks/gpu/vllm_compare.py --hf speed_hf.json --vllm speed_vllm.json [--json_out compare.json]

Same records, same prompts, greedy, output length fixed at the same --new_tokens in both. samples/s: vLLM (the
tool's engine), hf --compile, hf eager (batched, the product's path), a per-sample generate loop (measured on a
spread subset, see bench_infer --loop_n), and vLLM's offline LLM.generate (the code before). Targets: vLLM >= 2x hf
--compile and >= 25x the loop.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True)
    parser.add_argument("--vllm", required=True)
    parser.add_argument("--json_out")
    args = parser.parse_args()
    if not Path(args.hf).is_file() or not Path(args.vllm).is_file():
        print(f"need both {args.hf} and {args.vllm} (run speed_hf, then speed_vllm)", file=sys.stderr)
        return 2
    hf, vl = json.loads(Path(args.hf).read_text()), json.loads(Path(args.vllm).read_text())
    by_kernels = {r["kernels"]: r for r in hf["batch_sweep"]}
    speeds = {r["variant"]: r for r in vl["speed"]}
    rates = {
        "vllm": speeds.get("default", {}).get("samples_per_s"),
        "hf_compile": by_kernels.get("compiled", {}).get("samples_per_s"),
        "hf_eager": by_kernels.get("eager", {}).get("samples_per_s"),
        "per_sample_loop": hf.get("per_sample_loop_samples_per_s"),
        "vllm_offline_llm_before": speeds.get("offline_llm (before)", {}).get("samples_per_s"),
    }
    ratios = {f"vllm_over_{k}": round(rates["vllm"] / v, 2) for k, v in rates.items()
              if k != "vllm" and v and rates["vllm"]}
    same = hf["records"] == vl["records"] and hf["new_tokens"] == vl["new_tokens"]
    result = {"records": vl["records"], "images": vl["images"], "new_tokens": vl["new_tokens"],
              "same_records_and_length": same, "device": vl.get("device"), "samples_per_s": rates, "ratios": ratios,
              "targets": {"vllm >= 2x hf --compile": (ratios.get("vllm_over_hf_compile") or 0) >= 2,
                          "vllm >= 25x the loop": (ratios.get("vllm_over_per_sample_loop") or 0) >= 25},
              "loop_measured_on": hf.get("per_sample_loop_records"),
              "vllm_phases": speeds.get("default", {}).get("phases"),
              "errors": {name: r["error"] for name, r in speeds.items() if "error" in r}}
    print(json.dumps(result, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
