"""The packed per-record attention (mire_factory/attention.py, `mire_packed_varlen`) on the GPU against transformers'
SDPA over LLaMA-Factory's dense block-diagonal mask: outputs and gradients for every real token, and the time of one
forward + backward of each at the 7B packed shape (10,240 tokens of ~1,174-token records, 28 query and 4 key/value
heads of 128). On the CPU the per-record path is one SDPA call a record (no varlen kernel), so only the comparison
means anything there.

    python benchmarks/gpu/check_varlen.py --out check_varlen.json
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from llamafactory.data.collator import prepare_4d_attention_mask
from transformers.integrations.sdpa_attention import sdpa_attention_forward

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mire_factory import attention  # noqa: E402
from mire_factory.io import run_cli, write_json_atomic  # noqa: E402


def record_indices(length: int, mean_record: int, seed: int) -> list[int]:
    """LLaMA-Factory's packed attention mask row: record numbers 1, 2, ... per token, records of random lengths."""
    rng = torch.Generator().manual_seed(seed)
    row, record = [], 1
    while len(row) < length:
        size = int(torch.randint(mean_record // 2, mean_record * 3 // 2, (1,), generator=rng))
        row += [record] * min(size, length - len(row))
        record += 1
    return row


def timed(fn, repeats: int, device: str) -> list[float]:
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=10240)
    parser.add_argument("--mean_record", type=int, default=1174)
    parser.add_argument("--heads", type=int, default=28)
    parser.add_argument("--kv_heads", type=int, default=4)
    parser.add_argument("--head_dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    row = record_indices(args.length, args.mean_record, seed=0)
    mask = prepare_4d_attention_mask(torch.tensor([row]), dtype).to(device)
    module = SimpleNamespace(num_key_value_groups=args.heads // args.kv_heads, is_causal=True, training=True)
    torch.manual_seed(0)
    shape = (1, args.heads, args.length, args.head_dim)
    kv_shape = (1, args.kv_heads, args.length, args.head_dim)
    q = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(kv_shape, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(kv_shape, device=device, dtype=dtype, requires_grad=True)
    scaling = args.head_dim ** -0.5
    grad_out = torch.randn(1, args.length, args.heads, args.head_dim, device=device, dtype=dtype)

    def dense():
        return sdpa_attention_forward(module, q, k, v, mask, scaling=scaling)[0]

    def packed():
        return attention.packed_varlen_attention(module, q, k, v, mask, scaling=scaling)[0]

    results = {}
    for name, fn in (("dense_mask_sdpa", dense), ("packed_varlen", packed)):
        out = fn()
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        results[name] = (out.float(), [g.float() for g in grads])

        def step(fn=fn):
            torch.autograd.grad(fn(), (q, k, v), grad_out)

        step()  # warm-up
        results[name + "_s"] = timed(step, args.repeats, device)

    (out_d, grads_d), (out_p, grads_p) = results["dense_mask_sdpa"], results["packed_varlen"]
    scale = out_d.abs().max().item()
    report = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "dtype": str(dtype),
        "torch": torch.__version__, "length": args.length, "records": len(set(row)),
        "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
        "max_abs_diff_out": (out_p - out_d).abs().max().item(), "max_abs_out": scale,
        "max_abs_diff_grads": [(gp - gd).abs().max().item() for gp, gd in zip(grads_p, grads_d, strict=True)],
        "max_abs_grads": [gd.abs().max().item() for gd in grads_d],
    }
    for name in ("dense_mask_sdpa", "packed_varlen"):
        times = results[name + "_s"]
        report[name + "_fwd_bwd_s"] = {"min": min(times), "median": statistics.median(times), "max": max(times)}
    report["speedup_median"] = (report["dense_mask_sdpa_fwd_bwd_s"]["median"]
                                / report["packed_varlen_fwd_bwd_s"]["median"])
    print(json.dumps(report, indent=1))
    if args.out:
        write_json_atomic(args.out, report)


if __name__ == "__main__":
    run_cli(main)
