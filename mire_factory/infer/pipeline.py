"""tools.vllm_infer's work: load, shard, resume, plan, render, generate, write."""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..io import MireInputError
from .dataset import load_dataset
from .output import Appender, finalize, read_done
from .shards import merge_shards, shard_path, shard_range
from .vllm_inputs import COMPETITION_MAX_NEW_TOKENS


@dataclass
class InferArgs:
    model_name_or_path: str | None
    dataset: str
    dataset_dir: str
    adapter_name_or_path: str | None = None
    template: str = "qwen2_vl"
    backend: str | None = None  # vllm when importable, else hf
    save_name: str = "generated_predictions.jsonl"
    cutoff_len: int = 4096
    max_new_tokens: int = 100
    image_max_pixels: int = 768 * 768
    image_min_pixels: int = 32 * 32
    max_images_per_prompt: int | None = None
    batch_size: int = 32
    compile: bool = False
    constrained: bool = False
    answer_format: str = "label"
    label_position: str = "last"
    num_shards: int = 1
    shard_index: int = 0
    merge_shards: bool = False
    tensor_parallel_size: int = 1
    vllm_engine_args: str | None = None  # JSON object of extra vLLM engine arguments
    vllm_renderer_workers: int = 8
    vllm_max_in_flight: int = 512
    image_workers: int = 8
    cot_reason_chars: int | None = None
    no_competition_limits: bool = False


def default_backend() -> str:
    return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"


def check_args(args: InferArgs) -> None:
    if args.max_new_tokens > COMPETITION_MAX_NEW_TOKENS and not args.no_competition_limits:
        raise MireInputError(f"--max_new_tokens {args.max_new_tokens} exceeds the competition limit of "
                             f"{COMPETITION_MAX_NEW_TOKENS}; pass --no_competition_limits to allow it")
    if not args.merge_shards and not args.model_name_or_path:
        raise MireInputError("--model_name_or_path is required (except with --merge_shards)")
    if args.compile and args.backend == "vllm":
        raise MireInputError("--compile is for the hf backend (vLLM compiles its own graphs)")
    if args.max_images_per_prompt is not None and args.max_images_per_prompt < 1:
        raise MireInputError("--max_images_per_prompt must be >= 1")
    vllm_engine_args(args)
    for name in ("vllm_renderer_workers", "vllm_max_in_flight", "image_workers"):
        if getattr(args, name) < 1:
            raise MireInputError(f"--{name} must be >= 1")


def vllm_engine_args(args: InferArgs) -> dict:
    """--vllm_engine_args as a dict (a JSON object of vLLM engine arguments, e.g. '{"max_num_seqs": 512}')."""
    if not args.vllm_engine_args:
        return {}
    try:
        extra = json.loads(args.vllm_engine_args)
    except json.JSONDecodeError as exc:
        raise MireInputError(f"--vllm_engine_args: not valid JSON ({exc.msg})") from None
    if not isinstance(extra, dict):
        raise MireInputError("--vllm_engine_args: expected a JSON object of engine arguments")
    return extra


def run(args: InferArgs) -> Path:
    check_args(args)
    records = load_dataset(args.dataset, args.dataset_dir)
    save_path = Path(args.save_name)
    if args.merge_shards:
        n = merge_shards(save_path, args.num_shards, [r.id for r in records])
        print(f"merged {args.num_shards} shards: {n} predictions -> {save_path}")
        return save_path
    if args.num_shards > 1:
        records = [records[i] for i in shard_range(len(records), args.num_shards, args.shard_index)]
        save_path = shard_path(save_path, args.shard_index, args.num_shards)
    done = read_done(save_path)
    todo = [r for r in records if r.id not in done]
    print(f"{len(records)} records, {len(records) - len(todo)} already in {save_path}, {len(todo)} to predict")
    if todo:
        _predict(args, todo, save_path)
    finalize(save_path, [r.id for r in records])
    return save_path


def prepare(args: InferArgs, todo):
    """LLaMA-Factory's components, the truncation plans and the rendered prompt ids (one image-pad token per
    image) of the records: what every backend, and the benchmarks, start from."""
    from .render import load_components, render_prompt_ids
    from .truncation import ImageTokenizer, Planner

    comp = load_components(args.model_name_or_path, args.template, args.adapter_name_or_path,
                           args.image_max_pixels, args.image_min_pixels, args.cutoff_len)
    planner = Planner(comp.tokenizer, ImageTokenizer.from_processor(comp.processor),
                      overhead=len(render_prompt_ids(comp, "", [])), cutoff_len=args.cutoff_len,
                      max_images=args.max_images_per_prompt)
    plans = planner.plan_many(todo)
    n_cut = sum(bool(p.dropped_turns or p.dropped_images) for p in plans)
    n_over = sum(p.over_budget for p in plans)
    print(f"planned {len(plans)} prompts: {n_cut} truncated, {n_over} still over cutoff_len {args.cutoff_len}")
    prompt_ids = [render_prompt_ids(comp, p.content, p.images, r.system) for r, p in zip(todo, plans, strict=True)]
    return comp, plans, prompt_ids


def _predict(args: InferArgs, todo, save_path: Path) -> None:
    from tqdm import tqdm

    from .answer import AnswerConstraints

    backend = args.backend or default_backend()
    comp, plans, prompt_ids = prepare(args, todo)
    if args.constrained:
        _check_room_for_answers(comp, args)

    def row(r, p, ids, predict):
        return {"id": r.id, "prompt": comp.tokenizer.decode(ids, skip_special_tokens=False), "predict": predict,
                "label": r.label, "task": r.task, "truncation": p.info()}

    out = Appender(save_path)
    try:
        if backend == "hf":
            from .hf_backend import GenItem, generate_sorted, load_hf_model

            model = load_hf_model(comp)
            constraints = (AnswerConstraints(comp.tokenizer, comp.stop_id, args.answer_format, args.label_position)
                           if args.constrained else None)
            items = [GenItem(ids, p.images, r.task) for r, p, ids in zip(todo, plans, prompt_ids, strict=True)]
            batches = generate_sorted(model, comp, items, [p.n_tokens for p in plans], args.batch_size,
                                      args.max_new_tokens, constraints, compiled=args.compile)
            with tqdm(total=len(items), desc="hf generate") as bar:
                for batch, predicts in batches:
                    out.write([row(todo[i], plans[i], prompt_ids[i], pred)
                               for i, pred in zip(batch, predicts, strict=True)])
                    bar.update(len(batch))
        elif backend == "vllm":
            _predict_vllm(args, comp, todo, plans, prompt_ids, row, out)
        else:
            raise MireInputError(f"--backend must be vllm or hf, got {backend!r}")
    finally:
        out.close()


def _predict_vllm(args: InferArgs, comp, todo, plans, prompt_ids, row, out) -> None:
    """Every record through one vLLM engine; each answer is written (in batches of at most a second's worth) as soon
    as it is finished, so progress is per record and a kill loses only the requests in flight."""
    from tqdm import tqdm

    from .vllm_backend import VllmEngine, VllmRequest, sampling_params
    from .vllm_inputs import engine_kwargs, sampling_kwargs

    kwargs = engine_kwargs(args.model_name_or_path, plans, args.cutoff_len, args.max_new_tokens,
                           args.adapter_name_or_path, args.tensor_parallel_size,
                           renderer_workers=args.vllm_renderer_workers, extra=vllm_engine_args(args))
    engine = VllmEngine(kwargs, args.adapter_name_or_path, args.image_workers, args.image_max_pixels,
                        args.image_min_pixels, comp.template.mm_plugin)
    try:
        stop_ids = comp.template.get_stop_token_ids(comp.tokenizer)
        params = {task: sampling_params(sampling_kwargs(task, args.max_new_tokens, stop_ids, args.constrained,
                                                        args.answer_format, args.label_position,
                                                        args.cot_reason_chars))
                  for task in ("image", "dialogue")}
        requests = [VllmRequest(i, prompt_ids[i], plans[i].images, params[r.task]) for i, r in enumerate(todo)]
        pending: list[dict] = []
        last_write = time.monotonic()
        with tqdm(total=len(requests), desc="vllm generate") as bar:

            def on_output(answer) -> None:
                nonlocal last_write
                i = answer.key
                pending.append(row(todo[i], plans[i], prompt_ids[i], answer.text))
                bar.update(1)
                if len(pending) >= 256 or time.monotonic() - last_write > 1.0:
                    out.write(pending)
                    pending.clear()
                    last_write = time.monotonic()

            try:
                engine.run(requests, on_output, args.vllm_max_in_flight)
            finally:
                if pending:
                    out.write(pending)
    finally:
        engine.close()


def _check_room_for_answers(comp, args: InferArgs) -> None:
    """Constrained decoding cut off by max_new_tokens would leave half a label: refuse up front."""
    from .answer import answer_paths

    needed = 0
    for task in ("image", "dialogue"):
        for path in answer_paths(task, args.answer_format, args.label_position):
            # Fixed text costs at most one token per character (the grammar may use any tokenization of it).
            fixed = len(comp.tokenizer.encode(path.a, add_special_tokens=False)) if args.answer_format == "label" \
                else len(path.a) + len(path.b)
            needed = max(needed, fixed + 1)
    if args.max_new_tokens < needed:
        raise MireInputError(f"--max_new_tokens {args.max_new_tokens} is too small for --constrained "
                             f"--answer_format {args.answer_format}: the longest answer needs {needed} tokens")
