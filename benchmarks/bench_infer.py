"""hf backend, batched, against a per-sample `generate` loop like the seed projects' (issue 6, item 3).

python -m benchmarks.bench_infer [--model DIR] [--preset 2b] [--n 256] [--batch_size 32 [64 ...]] [--new_tokens 16]
    [--kernels eager compiled] [--images_on device cpu] [--phases] [--skip_loop] [--loop_n N]
    [--dataset mire_test --dataset_dir D] [--image_max_pixels 602112] [--cutoff_len 4096] [--plan_records 10000]
    [--out bench_infer.json]

Same model (random weights: `make_tiny_model --preset 2b` unless --model is given), same 256 synthetic MIRE records
(half image scenes, half dialogues with 0-4 screenshot-sized images), same prompts (rendered once, through
LLaMA-Factory's template), output length fixed (min_new_tokens == max_new_tokens), greedy. --dataset_dir takes a
converted real test set instead of the synthetic records (benchmarks.bench_vllm reads the same one); --loop_n times
the per-sample loop on every k-th record only (N of them), its samples/s standing for the whole set. Also times the
truncation planner on --plan_records records (header reads + one batched tokenizer call). Prints a JSON summary.
The batched run is the product's own path (`hf_backend.generate_sorted`'s pieces, as `tools.vllm_infer --backend hf`
runs them: length-sorted batches, the next batch's images prepared in background threads); several --batch_size values
are timed one after the other, the first one gives the headline figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from mire_factory.infer.hf_backend import (
    GenItem,
    default_image_workers,
    finish_on_device,
    first_batch_size,
    generate_batch,
    generate_prepared,
    length_sorted_batches,
    load_hf_model,
    prefetched,
    prepare_batch,
)
from mire_factory.infer.render import load_components, render_prompt_ids
from mire_factory.infer.truncation import ImageTokenizer, Planner
from mire_factory.sharegpt import chat_row, read_sharegpt, sharegpt_entry
from mire_factory.synthetic import make_records


def write_dataset(root: Path, n: int, image_size: tuple[int, int]) -> Path:
    records = make_records(n // 2, n - n // 2, root / "images", seed=0, image_size=image_size, max_dialogue_images=4,
                           image_format="JPEG", with_labels=False)
    rows = [chat_row(r["instruction"], "", [f"images/{name}" for name in r["image"]], row_id=r["id"]) for r in records]
    (root / "bench.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    info = {"bench": sharegpt_entry("bench.json")}
    (root / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return root


def sorted_run(model, comp, items: list[GenItem], lengths: list[int], batch_size: int, new_tokens: int,
               workers: int | None = None, images_on_device: bool | None = None, compiled: bool = False,
               stats: dict | None = None):
    """hf_backend.generate_sorted, piece by piece as it runs them (length-sorted batches, the next one prefetched),
    with this benchmark's knobs: a fixed output length, the image threads, where the image processor runs, and
    the seconds spent waiting for prepared batches and generating (into `stats`)."""
    on_gpu = model.device.type == "cuda"
    on_device = on_gpu if images_on_device is None else images_on_device
    batches = length_sorted_batches(lengths, batch_size, first=first_batch_size(batch_size, on_gpu))
    stats = {} if stats is None else stats
    stats.update(wait_s=0.0, generate_s=0.0)
    ready_batches = prefetched(comp, items, batches, model.dtype, on_gpu, workers or default_image_workers(),
                               model.device if on_device else None)
    while True:
        start = time.perf_counter()
        batch, prepared = next(ready_batches, (None, None))
        if batch is None:
            return
        ready = time.perf_counter()
        answers = generate_prepared(model, comp, prepared, new_tokens, min_new_tokens=new_tokens, compiled=compiled)
        stats["wait_s"] += ready - start
        stats["generate_s"] += time.perf_counter() - ready
        yield batch, answers


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_phases(model, comp, items, plans, batch_size: int, new_tokens: int, compiled: bool = False,
                reference=None) -> tuple[dict, object]:
    """One batch (the longest) phase by phase, each synchronised: where does a batch's time go?

    Returns the timings and the vision tower's output; given the eager run's output as reference, a compiled run
    also reports how far its vision features are from it.
    """
    import torch

    batch = [items[i] for i in length_sorted_batches([pl.n_tokens for pl in plans], batch_size)[0]]

    def timed(fn):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        return out, round(time.perf_counter() - start, 3)

    _, cpu_prepare = timed(lambda: prepare_batch(comp, batch, model.dtype, pin=torch.cuda.is_available()))
    split, decode = timed(lambda: prepare_batch(comp, batch, image_device=model.device))
    ready, device_images = timed(lambda: finish_on_device(comp, split, model.device))
    pixels = ready.mm["pixel_values"].to(model.device, model.dtype)
    grid = ready.mm["image_grid_thw"].to(model.device)
    with torch.inference_mode():
        features, vision = timed(lambda: model.model.visual(pixels, grid_thw=grid).pooler_output)
    _, prefill = timed(lambda: generate_prepared(model, comp, ready, 1, min_new_tokens=1, compiled=compiled))
    _, full = timed(lambda: generate_prepared(model, comp, ready, new_tokens, min_new_tokens=new_tokens,
                                              compiled=compiled))
    out = {"kernels": "compiled" if compiled else "eager", "batch_size": len(batch), "images": len(grid),
           "tokens": int(ready.attention_mask.sum()), "width": ready.width,
           "cpu_image_processing_s": cpu_prepare, "image_decode_and_resize_s": decode,
           "image_processor_on_device_s": device_images, "vision_tower_s": vision,
           "generate_1_token_s": prefill, f"generate_{new_tokens}_tokens_s": full}
    if reference is not None:
        diff = (features.float() - reference.float()).abs()
        out["vision_features_vs_eager"] = {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(),
                                           "mean_abs_value": reference.float().abs().mean().item()}
    return out, features


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a Qwen2-VL checkpoint; default: a random-weight one built with --preset")
    p.add_argument("--preset", default="2b")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--batch_size", type=int, nargs="+", default=[32])
    p.add_argument("--image_workers", type=int, default=None,
                   help="threads preparing a batch's images (default: the product's, min(8, cpus))")
    p.add_argument("--images_on", nargs="+", choices=["device", "cpu"], default=["device"],
                   help="where the image processor runs in the batched runs (device: the product's default on a GPU)")
    p.add_argument("--kernels", nargs="+", choices=["eager", "compiled"], default=["eager"],
                   help="batched runs as they are, or with tools.vllm_infer --compile (varlen attention and compiled "
                        "blocks in the vision tower, compiled decode steps); a compiled run is timed after one "
                        "untimed pass over all records, which compiles. The first one given is the headline")
    p.add_argument("--phases", action="store_true", help="also time one batch phase by phase (images, vision, prefill)")
    p.add_argument("--new_tokens", type=int, default=16)
    p.add_argument("--image_max_pixels", type=int, default=602112)
    p.add_argument("--image_width", type=int, default=585)
    p.add_argument("--image_height", type=int, default=1266)
    p.add_argument("--cutoff_len", type=int, default=4096)
    p.add_argument("--plan_records", type=int, default=10000)
    p.add_argument("--skip_loop", action="store_true", help="time the batched run only")
    p.add_argument("--loop_n", type=int, help="per-sample loop on N records spread over the set (default: all)")
    p.add_argument("--dataset", default="mire_test")
    p.add_argument("--dataset_dir", help="a converted test set (tools.convert) instead of synthetic records")
    p.add_argument("--out", default="bench_infer.json")
    args = p.parse_args()

    import torch

    work = Path(tempfile.mkdtemp(prefix="bench_infer_"))
    model_dir = args.model
    if model_dir is None:
        from mire_factory.tiny_model import make_tiny_model

        device = "cuda" if torch.cuda.is_available() else "cpu"
        model_dir = str(make_tiny_model(work / "model", preset=args.preset, seed=0, device=device))
    if args.dataset_dir:
        ds, name = Path(args.dataset_dir), args.dataset
    else:
        ds, name = write_dataset(work / "data", args.n, (args.image_width, args.image_height)), "bench"

    comp = load_components(model_dir, image_max_pixels=args.image_max_pixels, cutoff_len=args.cutoff_len)
    records = read_sharegpt(name, ds)
    planner = Planner(comp.tokenizer, ImageTokenizer.from_processor(comp.processor),
                      len(render_prompt_ids(comp, "", [])), args.cutoff_len)

    many = (records * (args.plan_records // len(records) + 1))[: args.plan_records]
    start = time.perf_counter()
    planner.plan_many(many)  # image sizes read from the headers: part of the figure
    plan_s = time.perf_counter() - start

    plans = planner.plan_many(records)
    items = [GenItem(render_prompt_ids(comp, pl.content, pl.images), pl.images, r.task)
             for r, pl in zip(records, plans, strict=True)]
    model = load_hf_model(comp)
    # warm-up: kernels, allocator pools and the per-sample path, so that no timed run pays for starting up
    generate_batch(model, comp, items[:2], args.new_tokens, min_new_tokens=args.new_tokens)
    warm = items[: args.batch_size[0] * 2]
    for _ in sorted_run(model, comp, warm, [len(it.prompt_ids) for it in warm], args.batch_size[0],
                        args.new_tokens, workers=args.image_workers):
        pass
    sync()

    def batched_run(batch_size: int, where: str, kernels: str) -> dict:
        start = time.perf_counter()
        stats, answers = {}, [None] * len(items)
        for batch, outs in sorted_run(model, comp, items, [pl.n_tokens for pl in plans], batch_size, args.new_tokens,
                                      workers=args.image_workers, images_on_device=where == "device",
                                      compiled=kernels == "compiled", stats=stats):
            for i, out in zip(batch, outs, strict=True):
                answers[i] = out
        sync()
        return {"batched_s": time.perf_counter() - start, **stats, "answers": answers}

    loop_s = loop_measured_s = None
    loop_items = items if not args.loop_n or args.loop_n >= len(items) else \
        items[:: -(-len(items) // args.loop_n)][: args.loop_n]
    if not args.skip_loop:  # before any compiled run: --compile changes the vision tower for good
        start = time.perf_counter()
        for item in loop_items:  # the seed projects' way: one generate call per sample
            generate_batch(model, comp, [item], args.new_tokens, min_new_tokens=args.new_tokens)
        sync()
        loop_measured_s = time.perf_counter() - start
        loop_s = loop_measured_s * len(items) / len(loop_items)  # at the measured samples/s, for every record

    sweep, phases, reference, eager_answers = [], [], None, None
    for kernels in sorted(set(args.kernels), key=["eager", "compiled"].index):
        for batch_size, where in [(b, w) for b in args.batch_size for w in args.images_on]:
            cold = batched_run(batch_size, where, kernels)["batched_s"] if kernels == "compiled" else None
            run = batched_run(batch_size, where, kernels)
            answers = run.pop("answers")
            eager_answers = eager_answers or answers
            same = sum(a == b for a, b in zip(answers, eager_answers, strict=True))
            sweep.append({"kernels": kernels, "batch_size": batch_size, "images_on": where, **run,
                          "first_pass_s": cold, "answers_equal_to_first_eager_run": f"{same}/{len(items)}"})
            print(json.dumps(sweep[-1]), flush=True)
        if args.phases:
            timings, features = time_phases(model, comp, items, plans, args.batch_size[0], args.new_tokens,
                                            kernels == "compiled", reference)
            reference = reference if reference is not None else features
            phases.append(timings)
    headline = next(r for r in sweep if r["kernels"] == args.kernels[0])
    batched_s = headline["batched_s"]

    summary = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "model": args.model or f"make_tiny_model --preset {args.preset} (random weights)",
        "dataset": f"{args.dataset_dir}:{args.dataset}" if args.dataset_dir else f"synthetic, {args.n} records",
        "dtype": str(model.dtype),
        "records": len(items),
        "images": sum(len(it.images) for it in items),
        "mean_prompt_tokens": round(sum(pl.n_tokens for pl in plans) / len(plans), 1),
        "new_tokens": args.new_tokens,
        "kernels": args.kernels[0],
        "batch_size": args.batch_size[0],
        "batched_s": round(batched_s, 2),
        "batched_samples_per_s": round(len(items) / batched_s, 2),
        "per_sample_loop_s": loop_s and round(loop_s, 2),
        "per_sample_loop_records": len(loop_items) if loop_s else None,
        "per_sample_loop_measured_s": loop_measured_s and round(loop_measured_s, 2),
        "per_sample_loop_samples_per_s": loop_s and round(len(loop_items) / loop_measured_s, 3),
        "speedup": loop_s and round(loop_s / batched_s, 2),
        "batch_sweep": [{"kernels": r["kernels"], "batch_size": r["batch_size"], "images_on": r["images_on"],
                         "batched_s": round(r["batched_s"], 2),
                         "samples_per_s": round(len(items) / r["batched_s"], 2),
                         "speedup": loop_s and round(loop_s / r["batched_s"], 2),
                         "waiting_for_images_s": round(r["wait_s"], 2), "generate_s": round(r["generate_s"], 2),
                         "first_pass_s": r["first_pass_s"] and round(r["first_pass_s"], 2),
                         "answers_equal_to_first_eager_run": r["answers_equal_to_first_eager_run"]}
                        for r in sweep],
        "phases_of_the_longest_batch": phases or None,
        "plan_records": len(many),
        "plan_s": round(plan_s, 2),
    }
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
