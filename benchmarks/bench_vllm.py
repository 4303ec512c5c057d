"""vLLM as tools.vllm_infer --backend vllm drives it, on a converted MIRE set: identity with training, speed, phases.

python -m benchmarks.bench_vllm --model DIR --dataset mire_test --dataset_dir D [--every K] [--limit N] [--out F.json]
    [--check] [--engine_ids] [--speed] [--phases] [--variants default renderer16 ...] [--offline_llm]
    [--new_tokens 16] [--cpu]

--check       for every record, the prompt vLLM's processor makes (image placeholders expanded) against LLaMA-Factory's
              training encoding (render_prompt_ids + expand_image_tokens with the training processor's grids), and
              the pixels vLLM's processor gives the model against mm_plugin's `_get_mm_inputs` (bf16, as both
              models see them). --cpu does this without a GPU: vLLM's renderer alone, on its CPU platform.
--engine_ids  the engine's own `prompt_token_ids` of each RequestOutput (one generated token) against training's.
--speed       samples/s over all records, output length fixed at --new_tokens (greedy; as benchmarks.bench_infer
              does for the hf backend), one engine per --variants entry (the first, `default`, is the tool's own
              setting), each timed after a warm-up, with the prefix and encoder caches emptied first.
--phases      with the first variant: the CPU preprocessing alone (our image threads + vLLM's processor threads),
              then on pre-rendered inputs one token (vision encoder + prefill), --new_tokens tokens (+ decode), and
              one token with the images replaced by as many text tokens (prefill without the vision encoder).
--offline_llm the code before: vllm.LLM.generate over the list, images regularized in the calling thread.
Prints and writes a compact JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

# every engine gets tools.vllm_infer's max_model_len (cutoff + 100): the same configuration hits vLLM's compile cache
MODEL_LEN_NEW_TOKENS = 100

VARIANTS = {
    # the tool's default: AsyncLLM, 8 renderer threads, no processor cache, 8 image threads
    "default": {},
    "renderer16": {"renderer_workers": 16, "image_workers": 16},
    # vLLM's own defaults for its processor: one renderer thread, with the 4 GiB processor cache
    "renderer1": {"renderer_workers": 1},
    "shm": {"engine": {"mm_tensor_ipc": "torch_shm"}},
    # the image processor's resize, normalisation and patching on the GPU (in the API process), as the hf backend does
    "gpu_processor": {"engine": {"mm_processor_kwargs": {"device": "cuda"}}},
    "batched32k": {"engine": {"max_num_batched_tokens": 32768}},
    "seqs256": {"engine": {"max_num_seqs": 256}},
    "eager": {"engine": {"enforce_eager": True}},
    "no_prefix_cache": {"engine": {"enable_prefix_caching": False}},
}


def load(args):
    from mire_factory.infer.pipeline import InferArgs, prepare
    from mire_factory.sharegpt import read_sharegpt

    records = read_sharegpt(args.dataset, args.dataset_dir)[:: args.every][: args.limit]
    infer_args = InferArgs(model_name_or_path=args.model, dataset=args.dataset, dataset_dir=args.dataset_dir,
                           cutoff_len=args.cutoff_len, image_max_pixels=args.image_max_pixels,
                           max_new_tokens=args.new_tokens)
    comp, plans, prompt_ids = prepare(infer_args, records)
    return records, comp, plans, prompt_ids


def training_encoding(comp, images: list[str], ids: list[int]):
    """What LLaMA-Factory trains on: the expanded ids, the pixel values and grids of mm_plugin's own processor call."""
    from mire_factory.infer.render import expand_image_tokens

    mm = comp.template.mm_plugin._get_mm_inputs(images, [], [], comp.processor) if images else {}
    grid = mm.get("image_grid_thw")
    counts = [int(g.prod()) // comp.merge_length for g in grid] if grid is not None else []
    return expand_image_tokens(ids, comp.image_pad_id, counts), mm.get("pixel_values"), grid


def vllm_pixels(engine_input):
    import torch

    items = engine_input.get("mm_kwargs", {}).get("image", []) if engine_input.get("mm_kwargs") else []
    if not items:
        return None, None
    return (torch.cat([item["pixel_values"].data for item in items]),
            torch.stack([item["image_grid_thw"].data for item in items]))


def check_identity(records, comp, plans, prompt_ids, rendered) -> dict:
    """Counts of records whose vLLM prompt ids, grids and pixels equal training's (bf16), with a few mismatches."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    out = {"records": len(records), "images": 0, "ids_equal": 0, "grids_equal": 0, "pixels_equal_bf16": 0,
           "pixels_max_abs_diff": 0.0, "mismatches": []}
    with ThreadPoolExecutor(8) as pool:  # mm_plugin's processor call per record, on CPU threads
        training = pool.map(lambda k: training_encoding(comp, plans[k].images, prompt_ids[k]), range(len(records)))
        training = list(training)
    for r, plan, engine_input, (train_ids, train_pixels, train_grid) in zip(records, plans, rendered, training,
                                                                            strict=True):
        v_pixels, v_grid = vllm_pixels(engine_input)
        ids_ok = list(engine_input["prompt_token_ids"]) == train_ids
        grid_ok = (train_grid is None and v_grid is None) or (
            train_grid is not None and v_grid is not None and torch.equal(train_grid.cpu(), v_grid.cpu()))
        pix_ok = train_pixels is None and v_pixels is None
        if train_pixels is not None and v_pixels is not None and train_pixels.shape == v_pixels.shape:
            reference = train_pixels.to(v_pixels.dtype)
            pix_ok = torch.equal(reference, v_pixels)
            diff = (train_pixels.float() - v_pixels.float()).abs().max().item()
            out["pixels_max_abs_diff"] = max(out["pixels_max_abs_diff"], diff)
        out["images"] += len(plan.images)
        out["ids_equal"] += ids_ok
        out["grids_equal"] += grid_ok
        out["pixels_equal_bf16"] += pix_ok
        if not (ids_ok and grid_ok and pix_ok) and len(out["mismatches"]) < 5:
            out["mismatches"].append({"id": r.id, "ids_equal": ids_ok, "grid_equal": grid_ok, "pixels_equal": pix_ok,
                                      "training_len": len(train_ids), "vllm_len": len(engine_input["prompt_token_ids"])})
    return out


def cpu_renderer(kwargs: dict):
    """vLLM's renderer without an engine or a GPU (its CPU platform): the processor side of --check, testable here."""
    import vllm.platforms
    from vllm.platforms.cpu import CpuPlatform

    vllm.platforms._current_platform = CpuPlatform()
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.renderers import renderer_from_config
    from vllm.usage.usage_lib import UsageContext

    config = AsyncEngineArgs(**kwargs).create_engine_config(UsageContext.LLM_CLASS)
    return renderer_from_config(config), config.model_config


def cpu_render_fn(args, comp, kwargs):
    """requests -> (engine inputs, RunStats), with vLLM's renderer on the CPU, as the engine path renders them."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from mire_factory.infer.vllm_backend import FirstAlone, RunStats, render_request
    from mire_factory.infer.vllm_inputs import image_uuids, regularized_images

    renderer, model_config = cpu_renderer(kwargs)
    loop = asyncio.new_event_loop()
    pool = ThreadPoolExecutor(args.image_workers)
    first_render = FirstAlone()

    def images(paths):
        return (regularized_images(comp.template.mm_plugin, paths, args.image_max_pixels, 32 * 32),
                image_uuids(paths, args.image_max_pixels, 32 * 32))

    def render(requests):
        stats = RunStats()

        async def go():
            return await asyncio.gather(*(first_render(
                lambda req=req: render_request(renderer, model_config, loop, pool, images, req, stats))
                for req in requests))

        start = time.perf_counter()
        rendered = loop.run_until_complete(go())
        stats.wall_s, stats.requests = time.perf_counter() - start, len(requests)
        return rendered, stats

    return render


def check_in_chunks(render, records, comp, plans, prompt_ids, requests, chunk: int = 32) -> dict:
    """check_identity over the records a chunk at a time (pixels of 600 records take ~20 GB: never all at once)."""
    total: dict = {}
    render_s = 0.0
    for start in range(0, len(records), chunk):
        idx = range(start, min(len(records), start + chunk))
        rendered, stats = render([requests[i] for i in idx])
        render_s += stats.wall_s
        part = check_identity([records[i] for i in idx], comp, [plans[i] for i in idx],
                              [prompt_ids[i] for i in idx], rendered)
        del rendered
        for key, value in part.items():
            if key == "mismatches":
                total[key] = (total.get(key, []) + value)[:5]
            elif key == "pixels_max_abs_diff":
                total[key] = max(total.get(key, 0.0), value)
            else:
                total[key] = total.get(key, 0) + value
    total["render_wall_s"] = round(render_s, 2)
    return total


def requests_for(records, plans, prompt_ids, params_by_task):
    from mire_factory.infer.vllm_backend import VllmRequest

    return [VllmRequest(i, ids, plan.images, params_by_task[r.task])
            for i, (r, plan, ids) in enumerate(zip(records, plans, prompt_ids, strict=True))]


def params_for(comp, max_tokens: int, min_tokens: int) -> dict:
    from mire_factory.infer.vllm_backend import sampling_params
    from mire_factory.infer.vllm_inputs import sampling_kwargs

    stop_ids = comp.template.get_stop_token_ids(comp.tokenizer)
    return {t: sampling_params(sampling_kwargs(t, max_tokens, stop_ids, min_new_tokens=min_tokens))
            for t in ("image", "dialogue")}


def timed(engine, requests, rendered=None) -> tuple[float, dict, dict]:
    answers = {}
    engine.reset_caches()
    stats = engine.run(requests, lambda o: answers.__setitem__(o.key, o), rendered=rendered)
    return stats.wall_s, stats.summary(), answers


def text_only(requests, rendered, pad_id: int, filler: int):
    """The same prompts with each image's tokens replaced by as many `filler` text tokens, no images."""
    from mire_factory.infer.vllm_backend import VllmRequest

    return [VllmRequest(req.key, [filler if t == pad_id else t for t in engine_input["prompt_token_ids"]], [],
                        req.params)
            for req, engine_input in zip(requests, rendered, strict=True)]


def run_variant(args, name, comp, records, plans, prompt_ids, base_kwargs, phases: bool) -> dict:
    from mire_factory.infer.vllm_backend import VllmEngine
    from mire_factory.infer.vllm_inputs import DEFAULT_RENDERER_WORKERS, engine_kwargs

    spec = VARIANTS[name]
    workers = spec.get("renderer_workers", DEFAULT_RENDERER_WORKERS)
    kwargs = engine_kwargs(args.model, plans, args.cutoff_len, MODEL_LEN_NEW_TOKENS, renderer_workers=workers,
                           extra={**base_kwargs, **spec.get("engine", {})})
    engine = VllmEngine(kwargs, None, spec.get("image_workers", args.image_workers), args.image_max_pixels,
                        32 * 32, comp.template.mm_plugin)
    result = {"variant": name, "engine_kwargs": {k: v for k, v in kwargs.items() if k != "model"},
              "engine_start_s": round(engine.start_s, 1)}
    try:
        fixed = params_for(comp, args.new_tokens, args.new_tokens)
        requests = requests_for(records, plans, prompt_ids, fixed)
        warm = requests[: args.warmup]
        engine.run(warm, lambda o: None)
        wall, summary, answers = timed(engine, requests)
        result.update(samples_per_s=round(len(requests) / wall, 2), wall_s=round(wall, 2), run=summary,
                      answers=[answers[k].text for k in range(len(requests))])
        if phases:
            rendered, render_stats = engine.render_all(requests)
            one = params_for(comp, 1, 1)
            requests_1 = requests_for(records, plans, prompt_ids, one)
            prefill_s, _, _ = timed(engine, requests_1, rendered)
            full_s, _, _ = timed(engine, requests, rendered)
            filler = comp.tokenizer.encode("的", add_special_tokens=False)[0]
            text_s, _, _ = timed(engine, text_only(requests_1, rendered, comp.image_pad_id, filler))
            result["phases"] = {
                "preprocess_only_wall_s": round(render_stats.wall_s, 2),
                "preprocess_per_request_ms": render_stats.summary()["per_request_ms"],
                "engine_1_token_on_rendered_s": round(prefill_s, 2),
                f"engine_{args.new_tokens}_tokens_on_rendered_s": round(full_s, 2),
                "engine_1_token_text_only_s": round(text_s, 2),
                "vision_encoder_s (1 token - text only)": round(prefill_s - text_s, 2),
                "decode_s (full - 1 token)": round(full_s - prefill_s, 2),
                "not_overlapped_s (timed run - full on rendered)": round(wall - full_s, 2),
            }
    finally:
        engine.close()
    return result


def run_offline_llm(args, comp, records, plans, prompt_ids, base_kwargs) -> dict:
    """The code before this issue: vllm.LLM, one generate over the list, images regularized in the calling thread,
    vLLM's processor serial, nothing back until the whole list is done."""
    import gc

    from vllm import LLM

    from mire_factory.infer.vllm_inputs import engine_kwargs, prompt_input, regularized_images

    kwargs = engine_kwargs(args.model, plans, args.cutoff_len, MODEL_LEN_NEW_TOKENS, renderer_workers=1,
                           extra=base_kwargs)
    start = time.perf_counter()
    llm = LLM(**kwargs)
    start_s = time.perf_counter() - start
    fixed = params_for(comp, args.new_tokens, args.new_tokens)

    def prompts(idx):
        return [prompt_input(prompt_ids[i], regularized_images(comp.template.mm_plugin, plans[i].images,
                                                               args.image_max_pixels, 32 * 32)) for i in idx]

    warm = range(min(args.warmup, len(records)))
    llm.generate(prompts(warm), [fixed[records[i].task] for i in warm], use_tqdm=False)
    llm.reset_prefix_cache()
    start = time.perf_counter()
    everything = range(len(records))
    outs = llm.generate(prompts(everything), [fixed[records[i].task] for i in everything], use_tqdm=False)
    wall = time.perf_counter() - start
    del llm
    gc.collect()
    return {"variant": "offline_llm (before)", "engine_start_s": round(start_s, 1), "wall_s": round(wall, 2),
            "samples_per_s": round(len(records) / wall, 2), "answers": [o.outputs[0].text for o in outs]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", default="mire_test")
    p.add_argument("--dataset_dir", required=True)
    p.add_argument("--limit", type=int, help="the first N records (after --every)")
    p.add_argument("--every", type=int, default=1, help="every K-th record")
    p.add_argument("--cutoff_len", type=int, default=4096)
    p.add_argument("--image_max_pixels", type=int, default=768 * 768)
    p.add_argument("--image_workers", type=int, default=8)
    p.add_argument("--new_tokens", type=int, default=16)
    p.add_argument("--warmup", type=int, default=16)
    p.add_argument("--check", action="store_true")
    p.add_argument("--engine_ids", action="store_true")
    p.add_argument("--speed", action="store_true")
    p.add_argument("--phases", action="store_true")
    p.add_argument("--variants", nargs="+", default=["default"], choices=list(VARIANTS))
    p.add_argument("--offline_llm", action="store_true")
    p.add_argument("--engine_args", help="JSON object added to every engine's arguments")
    p.add_argument("--cpu", action="store_true", help="--check with vLLM's renderer alone (no GPU, no engine)")
    p.add_argument("--out", default="bench_vllm.json")
    args = p.parse_args()
    base_kwargs = json.loads(args.engine_args) if args.engine_args else {}

    records, comp, plans, prompt_ids = load(args)
    summary: dict = {"records": len(records), "images": sum(len(pl.images) for pl in plans),
                     "mean_prompt_tokens": round(sum(pl.n_tokens for pl in plans) / max(len(plans), 1), 1),
                     "new_tokens": args.new_tokens, "host": platform.node()}
    try:
        import torch
        import vllm

        summary["versions"] = {"vllm": vllm.__version__, "torch": torch.__version__}
        if torch.cuda.is_available():
            summary["device"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass

    def save():
        Path(args.out).write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

    if args.check and args.cpu:
        from mire_factory.infer.vllm_inputs import engine_kwargs

        kwargs = engine_kwargs(args.model, plans, args.cutoff_len, MODEL_LEN_NEW_TOKENS, extra=base_kwargs)
        requests = requests_for(records, plans, prompt_ids, {"image": None, "dialogue": None})
        summary["check"] = check_in_chunks(cpu_render_fn(args, comp, kwargs), records, comp, plans, prompt_ids,
                                           requests)
        print(json.dumps(summary["check"], ensure_ascii=False), flush=True)
        save()
        return

    if args.check or args.engine_ids:
        from concurrent.futures import ThreadPoolExecutor

        from mire_factory.infer.vllm_backend import VllmEngine
        from mire_factory.infer.vllm_inputs import engine_kwargs

        kwargs = engine_kwargs(args.model, plans, args.cutoff_len, MODEL_LEN_NEW_TOKENS, extra=base_kwargs)
        engine = VllmEngine(kwargs, None, args.image_workers, args.image_max_pixels, 32 * 32,
                            comp.template.mm_plugin)
        try:
            requests = requests_for(records, plans, prompt_ids, params_for(comp, 1, 1))
            if args.check:
                summary["check"] = check_in_chunks(engine.render_all, records, comp, plans, prompt_ids, requests)
                print(json.dumps(summary["check"], ensure_ascii=False), flush=True)
            if args.engine_ids:
                outputs = {}
                engine.run(requests, lambda o: outputs.__setitem__(o.key, o))
                equal, bad = 0, []
                with ThreadPoolExecutor(8) as pool:  # training's ids need the processor's grids: CPU threads
                    all_train_ids = list(pool.map(
                        lambda k: training_encoding(comp, plans[k].images, prompt_ids[k])[0], range(len(records))))
                for i, train_ids in enumerate(all_train_ids):
                    if outputs[i].prompt_token_ids == train_ids:
                        equal += 1
                    elif len(bad) < 5:
                        bad.append({"id": records[i].id, "training_len": len(train_ids),
                                    "vllm_len": len(outputs[i].prompt_token_ids)})
                summary["engine_prompt_token_ids"] = {"records": len(records), "equal_to_training": equal,
                                                      "mismatches": bad}
                print(json.dumps(summary["engine_prompt_token_ids"], ensure_ascii=False), flush=True)
        finally:
            engine.close()
        save()

    if args.speed:
        summary["speed"] = []
        for k, name in enumerate(args.variants):
            try:
                result = run_variant(args, name, comp, records, plans, prompt_ids, base_kwargs,
                                     args.phases and k == 0)
            except Exception as exc:  # noqa: BLE001 - one setting failing must not lose the others' figures
                summary["speed"].append({"variant": name, "error": f"{type(exc).__name__}: {exc}"[:2000]})
                print(json.dumps(summary["speed"][-1]), flush=True)
                save()
                continue
            answers = result.pop("answers")
            first = summary.get("_answers") or answers
            summary["_answers"] = first
            result["answers_equal_to_first_variant"] = f"{sum(a == b for a, b in zip(answers, first, strict=True))}/{len(first)}"
            summary["speed"].append(result)
            print(json.dumps(result, ensure_ascii=False), flush=True)
            save()
        if args.offline_llm:
            result = run_offline_llm(args, comp, records, plans, prompt_ids, base_kwargs)
            answers = result.pop("answers")
            result["answers_equal_to_first_variant"] = \
                f"{sum(a == b for a, b in zip(answers, summary['_answers'], strict=True))}/{len(answers)}"
            summary["speed"].append(result)
            print(json.dumps(result, ensure_ascii=False), flush=True)
        summary.pop("_answers", None)
        save()
    print(json.dumps({k: v for k, v in summary.items() if k not in ("check",)}, ensure_ascii=False)[:4000])


if __name__ == "__main__":
    main()
