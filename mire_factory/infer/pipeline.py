"""tools.vllm_infer's work: load, shard, resume (same origin only), plan, render, generate, write."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..dataset_info import DATASET_INFO, entry_variant
from ..io import MireInputError, problem
from ..prompt_variants import PROMPT_VARIANTS, PromptVariant
from ..records import IMAGE_ERRORS, image_error, image_size
from .args import InferArgs
from .dataset import dataset_entry, load_dataset
from .origin import make_origin, merge_shard_origins, start_output
from .output import Appender, finalize, lock_predictions, read_done
from .shards import merge_shards, shard_path, shard_range
from .vllm_inputs import COMPETITION_MAX_NEW_TOKENS

__all__ = ["InferArgs", "prepare", "run"]


def default_backend() -> str:
    # hf, measured: on an H200 (2B Qwen2-VL, 623 real records, 16 new tokens) hf eager did 13.1 samples/s and
    # vLLM 0.24.0 5.8 (benchmarks/gpu/results/h200/vllm/); vLLM's multimodal preprocessing runs on the CPU and is
    # not hidden behind the GPU. --backend vllm remains for serving and for larger models.
    return "hf"


def check_args(args: InferArgs) -> None:
    for name in ("dataset", "dataset_dir"):
        if not getattr(args, name):
            raise MireInputError(f"--{name} is required (or a --config that gives it)")
    if args.prompt_variant is not None and args.prompt_variant not in PROMPT_VARIANTS:
        raise MireInputError(f"--prompt_variant: unknown prompt variant {args.prompt_variant!r} "
                             f"(registered: {', '.join(PROMPT_VARIANTS)})")
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


def dataset_variant(args: InferArgs) -> PromptVariant:
    """The dataset's registered prompt variant; refused when the model was trained with another one."""
    info_path = Path(args.dataset_dir) / DATASET_INFO
    variant = entry_variant(dataset_entry(args.dataset, args.dataset_dir), info_path, args.dataset)
    if args.prompt_variant is not None and args.prompt_variant != variant.name:
        raise MireInputError(problem(
            info_path, None, args.dataset,
            f"registered with prompt variant {variant.name!r}, but the model was trained with "
            f"{args.prompt_variant!r}{f' ({args.config})' if args.config else ''}: convert the test file with "
            f"tools.convert --prompt_variant {args.prompt_variant}, so that its prompts are those of training"))
    return variant


def run(args: InferArgs) -> Path:
    check_args(args)
    variant = dataset_variant(args)
    records = load_dataset(args.dataset, args.dataset_dir)
    save_path = Path(args.save_name)
    if args.merge_shards:
        n = merge_shards(save_path, args.num_shards, [r.id for r in records])
        merge_shard_origins(save_path, [shard_path(save_path, i, args.num_shards) for i in range(args.num_shards)])
        print(f"merged {args.num_shards} shards: {n} predictions -> {save_path}")
        return save_path
    if args.num_shards > 1:
        records = [records[i] for i in shard_range(len(records), args.num_shards, args.shard_index)]
        save_path = shard_path(save_path, args.shard_index, args.num_shards)
    with lock_predictions(save_path):
        start_output(save_path, make_origin(args, variant), overwrite=args.overwrite)
        done = read_done(save_path)
        todo = [r for r in records if r.id not in done or (args.retry_failed and done[r.id].get("error"))]
        n_failed = sum(1 for r in records if r.id in done and done[r.id].get("error"))
        print(f"{len(records)} records, {len(records) - len(todo)} already in {save_path}"
              + (f" ({n_failed} of them failed; --retry_failed predicts them again)" if n_failed and not
                 args.retry_failed else "") + f", {len(todo)} to predict (prompt variant {variant.name})")
        if todo:
            _predict(args, variant, todo, save_path)
        finalize(save_path, [r.id for r in records])
        failed = [row for rid, row in read_done(save_path).items() if row.get("error")]
        if failed:
            print(f"{len(failed)} records failed (field 'error'; scored as invalid answers), e.g. "
                  f"{failed[0]['id']}: {failed[0]['error']}")
    return save_path


def _read_sizes(todo) -> tuple[list, dict[int, str]]:
    """Each record's image sizes from the headers; records whose images cannot be opened fail here (k -> reason)."""
    sizes, failed = [], {}
    for k, r in enumerate(todo):
        try:
            sizes.append([image_size(p) for p in r.images])
        except IMAGE_ERRORS as exc:
            sizes.append([])
            failed[k] = image_failure(exc)
    return sizes, failed


def image_failure(exc: BaseException) -> str:
    return f"cannot read an image of the record ({image_error(exc)})"


def failed_row(record, reason: str) -> dict:
    """A record that could not be predicted (its images): kept in the file, so that a rerun does not stall on it,
    and read downstream as an invalid answer."""
    return {"id": record.id, "prompt": "", "predict": "", "label": record.label, "task": record.task,
            "truncation": None, "error": reason}


def prepare(args: InferArgs, todo, sizes: list | None = None):
    """LLaMA-Factory's components, the truncation plans and the rendered prompt ids (one image-pad token per
    image) of the records: what every backend, and the benchmarks, start from. `sizes`: each record's image sizes
    (read from the headers when not given)."""
    from .render import load_components, render_prompt_ids
    from .truncation import ImageTokenizer, Planner

    comp = load_components(args.model_name_or_path, args.template, args.adapter_name_or_path,
                           args.image_max_pixels, args.image_min_pixels, args.cutoff_len)
    planner = Planner(comp.tokenizer, ImageTokenizer.from_processor(comp.processor),
                      overhead=len(render_prompt_ids(comp, "", [])), cutoff_len=args.cutoff_len,
                      max_images=args.max_images_per_prompt)
    plans = planner.plan_many(todo, sizes)
    n_cut = sum(bool(p.dropped_turns or p.dropped_images) for p in plans)
    n_over = sum(p.over_budget for p in plans)
    print(f"planned {len(plans)} prompts: {n_cut} truncated, {n_over} still over cutoff_len {args.cutoff_len}")
    prompt_ids = [render_prompt_ids(comp, p.content, p.images, r.system) for r, p in zip(todo, plans, strict=True)]
    return comp, plans, prompt_ids


def _predict(args: InferArgs, variant: PromptVariant, todo, save_path: Path) -> None:
    backend = args.backend or default_backend()
    if backend not in ("hf", "vllm"):
        raise MireInputError(f"--backend must be vllm or hf, got {backend!r}")
    sizes, failed = _read_sizes(todo)
    out = Appender(save_path)
    try:
        if failed:
            out.write([failed_row(todo[k], reason) for k, reason in failed.items()])
            todo = [r for k, r in enumerate(todo) if k not in failed]
            sizes = [s for k, s in enumerate(sizes) if k not in failed]
        if not todo:
            return
        comp, plans, prompt_ids = prepare(args, todo, sizes)
        if args.constrained:
            _check_room_for_answers(comp, args, variant)
        generate = _generate_hf if backend == "hf" else _generate_vllm
        generate(args, variant, comp, todo, plans, prompt_ids, out)
    finally:
        out.close()


def _row(comp, record, plan, ids, predict: str) -> dict:
    return {"id": record.id, "prompt": comp.tokenizer.decode(ids, skip_special_tokens=False), "predict": predict,
            "label": record.label, "task": record.task, "truncation": plan.info()}


def _generate_hf(args: InferArgs, variant: PromptVariant, comp, todo, plans, prompt_ids, out: Appender) -> None:
    from tqdm import tqdm

    from .answer import AnswerConstraints
    from .hf_backend import GenItem, generate_sorted, load_hf_model

    model = load_hf_model(comp)
    constraints = (AnswerConstraints(comp.tokenizer, comp.stop_id, variant.answer_format, variant.label_position)
                   if args.constrained else None)
    items = [GenItem(ids, p.images, r.task) for r, p, ids in zip(todo, plans, prompt_ids, strict=True)]
    with tqdm(total=len(items), desc="hf generate") as bar:

        def on_error(i: int, exc: BaseException) -> None:
            out.write([failed_row(todo[i], image_failure(exc))])
            bar.update(1)

        for batch, predicts in generate_sorted(model, comp, items, [p.n_tokens for p in plans], args.batch_size,
                                               args.max_new_tokens, constraints, compiled=args.compile,
                                               on_error=on_error):
            out.write([_row(comp, todo[i], plans[i], prompt_ids[i], pred) for i, pred in zip(batch, predicts,
                                                                                         strict=True)])
            bar.update(len(batch))


def _generate_vllm(args: InferArgs, variant: PromptVariant, comp, todo, plans, prompt_ids, out: Appender) -> None:
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
                                                        variant.answer_format, variant.label_position,
                                                        args.cot_reason_chars))
                  for task in ("image", "dialogue")}
        requests = [VllmRequest(i, prompt_ids[i], plans[i].images, params[r.task]) for i, r in enumerate(todo)]
        pending: list[dict] = []
        last_write = time.monotonic()
        with tqdm(total=len(requests), desc="vllm generate") as bar:

            def on_output(answer) -> None:
                nonlocal last_write
                i = answer.key
                pending.append(failed_row(todo[i], answer.error) if answer.error
                               else _row(comp, todo[i], plans[i], prompt_ids[i], answer.text))
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


def _check_room_for_answers(comp, args: InferArgs, variant: PromptVariant) -> None:
    """Constrained decoding cut off by max_new_tokens would leave half a label: refuse up front."""
    from .answer import answer_paths

    needed = 0
    for task in ("image", "dialogue"):
        for path in answer_paths(task, variant.answer_format, variant.label_position):
            # Fixed text costs at most one token per character (the grammar may use any tokenization of it).
            fixed = len(comp.tokenizer.encode(path.a, add_special_tokens=False)) \
                if variant.answer_format == "label" else len(path.a) + len(path.b)
            needed = max(needed, fixed + 1)
    if args.max_new_tokens < needed:
        raise MireInputError(f"--max_new_tokens {args.max_new_tokens} is too small for --constrained answers of "
                             f"prompt variant {variant.name}: the longest answer needs {needed} tokens")
