"""vLLM's processor cache under concurrent first requests, on the CPU (vLLM's renderer alone, no engine, no GPU).

    python benchmarks/gpu/processor_herd.py --model DIR --json_out FILE [--requests 16] [--renderer_workers 8]

vLLM builds its HF processor lazily through an unlocked functools.lru_cache: renderer threads that start together
each miss and each build one. Each mode runs in a fresh process (the cache is process-wide):
- cold: --requests renders submitted together on a fresh renderer;
- warm: one render alone first (what mire_factory.infer.vllm_backend.FirstAlone does), then the same renders together.
Needs vLLM importable (e.g. PYTHONPATH with the kit's wheels installed --target) and the repo root as cwd.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time


def one_mode(model: str, mode: str, requests: int, workers: int) -> dict:
    sys.path.insert(0, ".")
    from PIL import Image
    from vllm.renderers.inputs.preprocess import parse_model_prompt
    from vllm.transformers_utils import processor as vllm_processor

    from benchmarks.bench_vllm import cpu_renderer
    from mire_factory.infer.vllm_backend import prompt_input

    renderer, model_config = cpu_renderer({"model": model, "max_model_len": 4096, "mm_processor_cache_gb": 0,
                                           "limit_mm_per_prompt": {"image": 1, "video": 0},
                                           "renderer_num_workers": workers})
    image = Image.new("RGB", (640, 480), "white")
    # <|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|im_end|>: one image, its placeholder expanded
    ids = [151644, 872, 198, 151652, 151655, 151653, 151645]

    async def render(n: int, offset: int):
        prompts = [parse_model_prompt(model_config, prompt_input(ids, [image], [f"img{offset + i}"])) for i in range(n)]
        return await asyncio.gather(*(renderer.render_cmpl_async([p]) for p in prompts))

    out = {"mode": mode, "requests": requests, "renderer_workers": workers}
    if mode == "warm":
        start = time.perf_counter()
        asyncio.run(render(1, 10_000))
        out["first_alone_s"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    asyncio.run(render(requests, 0))
    out["concurrent_s"] = round(time.perf_counter() - start, 2)
    info = vllm_processor.cached_get_processor.cache_info()
    out["processor_cache"] = {"hits": info.hits, "misses": info.misses}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--renderer_workers", type=int, default=8)
    p.add_argument("--json_out")
    p.add_argument("--mode", choices=("cold", "warm"), help="(internal) one mode in this process")
    args = p.parse_args()
    if args.mode:
        print("RESULT " + json.dumps(one_mode(args.model, args.mode, args.requests, args.renderer_workers)))
        return
    results = []
    for mode in ("cold", "warm"):
        run = subprocess.run([sys.executable, __file__, "--model", args.model, "--requests", str(args.requests),
                              "--renderer_workers", str(args.renderer_workers), "--mode", mode],
                             capture_output=True, text=True)
        lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
        if run.returncode or not lines:
            sys.exit(f"{mode}: exit {run.returncode}: {run.stderr.strip().splitlines()[-1:]}")
        results.append(json.loads(lines[-1][len("RESULT "):]))
        print(json.dumps(results[-1]), flush=True)
    import os

    import vllm
    summary = {"vllm": vllm.__version__, "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
               "runs": results}
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
