"""tools.vllm_infer's work: load, shard, resume (same origin only), plan, render, generate, write."""

from __future__ import annotations

from pathlib import Path

from ..dataset_info import DATASET_INFO, dataset_entry, entry_caps, entry_variant, format_caps, parse_caps
from ..io import MireInputError, problem
from ..prompt_variants import PROMPT_VARIANTS, PromptVariant
from ..records import IMAGE_ERRORS, image_size
from ..rules import MAX_PARAMETERS, check_new_tokens, check_parameters, count_parameters
from ..sharegpt import read_sharegpt
from .args import InferArgs
from .backends import Job, failed_row, get_backend, image_failure
from .origin import make_origin, merge_shard_origins, start_output
from .output import PredictionsLog
from .shards import merge_shards, shard_path, shard_range
from .vllm_inputs import vllm_engine_args

__all__ = ["InferArgs", "prepare", "run"]


def check_args(args: InferArgs) -> None:
    for name in ("dataset", "dataset_dir"):
        if not getattr(args, name):
            raise MireInputError(f"--{name} is required (or a --config that gives it)")
    if args.prompt_variant is not None and args.prompt_variant not in PROMPT_VARIANTS:
        raise MireInputError(f"--prompt_variant: unknown prompt variant {args.prompt_variant!r} "
                             f"(registered: {', '.join(PROMPT_VARIANTS)})")
    if not args.no_competition_limits:
        check_new_tokens(args.max_new_tokens)
    if not args.merge_shards and not args.model_name_or_path:
        raise MireInputError("--model_name_or_path is required (except with --merge_shards)")
    if args.max_images_per_prompt is not None and args.max_images_per_prompt < 1:
        raise MireInputError("--max_images_per_prompt must be >= 1")
    vllm_engine_args(args)
    get_backend(args.backend).check_args(args)
    for name in ("vllm_renderer_workers", "vllm_max_in_flight", "image_workers"):
        if getattr(args, name) < 1:
            raise MireInputError(f"--{name} must be >= 1")


def check_model_size(args: InferArgs) -> None:
    """The competition's size rule, from the weights' headers before anything is loaded or written."""
    if args.no_competition_limits:
        return
    n = count_parameters(args.model_name_or_path, args.adapter_name_or_path)
    if n is None:
        print(f"note: no safetensors weights in {args.model_name_or_path} to count its parameters: the "
              f"competition's size rule (fewer than {MAX_PARAMETERS / 1e9:.0f}B) is not checked")
    else:
        check_parameters(n, args.model_name_or_path)


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


def check_dataset_caps(args: InferArgs) -> str:
    """The per-task pixel caps the dataset's images were shrunk to (tools.convert --scene_image_max_pixels /
    --dialogue_image_max_pixels; format_caps); refused when they are not the model's training data's: it would see
    other pixels than in training."""
    info_path = Path(args.dataset_dir) / DATASET_INFO
    have = entry_caps(dataset_entry(args.dataset, args.dataset_dir), info_path, args.dataset)
    if args.task_image_max_pixels is None:
        return format_caps(have)
    try:
        trained = parse_caps(args.task_image_max_pixels)
    except ValueError as exc:
        raise MireInputError(f"--task_image_max_pixels: {exc}") from None
    if have != trained:
        flags = " ".join(f"--{flag} {trained[t]}" for t, flag in (("image", "scene_image_max_pixels"),
                                                                   ("dialogue", "dialogue_image_max_pixels"))
                         if trained[t] is not None)
        raise MireInputError(problem(
            info_path, None, args.dataset,
            f"converted with per-task pixel caps {format_caps(have)}, but the model was trained on images converted "
            f"with {format_caps(trained)}{f' ({args.config})' if args.config else ''}: convert the test file with "
            f"tools.convert {flags or 'without --scene_image_max_pixels and --dialogue_image_max_pixels'}, so that "
            "its images are those of training"))
    return format_caps(have)


def run(args: InferArgs) -> Path:
    check_args(args)
    variant = dataset_variant(args)
    dataset_caps = check_dataset_caps(args)
    records = read_sharegpt(args.dataset, args.dataset_dir)
    save_path = Path(args.save_name)
    if args.merge_shards:
        n = merge_shards(save_path, args.num_shards, [r.id for r in records])
        merge_shard_origins(save_path, [shard_path(save_path, i, args.num_shards) for i in range(args.num_shards)])
        print(f"merged {args.num_shards} shards: {n} predictions -> {save_path}")
        return save_path
    check_model_size(args)
    if args.num_shards > 1:
        records = [records[i] for i in shard_range(len(records), args.num_shards, args.shard_index)]
        save_path = shard_path(save_path, args.shard_index, args.num_shards)
    log = PredictionsLog(save_path)
    with log.lock():
        start_output(save_path, make_origin(args, variant, dataset_caps), overwrite=args.overwrite)
        done = log.done()
        todo = [r for r in records if r.id not in done or (args.retry_failed and done[r.id].get("error"))]
        n_failed = sum(1 for r in records if r.id in done and done[r.id].get("error"))
        print(f"{len(records)} records, {len(records) - len(todo)} already in {save_path}"
              + (f" ({n_failed} of them failed; --retry_failed predicts them again)" if n_failed and not
                 args.retry_failed else "") + f", {len(todo)} to predict (prompt variant {variant.name})")
        if todo:
            _predict(args, variant, todo, save_path)
        log.finalize([r.id for r in records])
        failed = [row for row in log.done().values() if row.get("error")]
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
    backend = get_backend(args.backend)
    sizes, failed = _read_sizes(todo)
    out = PredictionsLog(save_path).open()
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
        backend.generate(Job(args, variant, comp, todo, plans, prompt_ids, out.write))
    finally:
        out.close()


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
