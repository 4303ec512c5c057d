"""The transformers backend: batched, length-sorted, left-padded generation with LLaMA-Factory's model loader."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..mrope import mrope_generate_kwargs
from ..records import IMAGE_ERRORS
from .backends import Backend, Job, image_failure
from .render import Components, expand_image_tokens


@dataclass
class GenItem:
    prompt_ids: list[int]  # one image-pad token per image
    images: list[str]
    task: str


def load_hf_model(comp: Components):
    """LLaMA-Factory's loader: the same dtype, attention and adapter handling as `llamafactory-cli`."""
    from llamafactory.model import load_model

    model = load_model(comp.tokenizer, comp.model_args, comp.finetuning_args, is_trainable=False)
    model.eval()
    return model


def length_sorted_batches(lengths: Sequence[int], batch_size: int, first: int | None = None) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (padding stays small, OOM shows early).

    first, when given, sizes the first batch alone: a small one gets the GPU going while the images of the next
    full batch are still being prepared (the first batch's preparation is the one wait nothing hides).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    head = min(first or batch_size, batch_size)
    return [order[:head]] + [order[k : k + batch_size] for k in range(head, len(order), batch_size)] if order else []


@dataclass
class PreparedBatch:
    """One batch's model inputs, built on the CPU (possibly in a background thread) before the GPU needs them.

    With `image_device` set, `images` holds the regularized (decoded, max-pixel-resized) images and
    `finish_on_device` runs the image processor there; otherwise the batch is complete as built.
    """

    items: list[GenItem]
    input_ids: Any = None
    attention_mask: Any = None
    mm: dict | None = None
    images: list | None = None

    @property
    def tasks(self) -> list[str]:
        return [item.task for item in self.items]

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]


def regularized_images(comp: Components, images: list[str]) -> list:
    """mm_plugin's own image loading and max-pixel resize (PIL), as `_get_mm_inputs` starts."""
    processor = comp.processor
    return comp.template.mm_plugin._regularize_images(
        images,
        image_max_pixels=getattr(processor, "image_max_pixels", 768 * 768),
        image_min_pixels=getattr(processor, "image_min_pixels", 32 * 32),
    )["images"]


def pixel_inputs(comp: Components, images: list, device=None) -> dict:
    """The processor's image step, as `_get_mm_inputs` ends it, on `device` (resize, normalize, patchify).

    On a GPU this replaces ~14 MB of float32 patch copies per screenshot on the CPU with a 2 MB uint8 upload.
    """
    out = comp.processor.image_processor(images, return_tensors="pt", **({"device": device} if device else {}))
    return {key: out[key] for key in ("pixel_values", "image_grid_thw")}


def image_inputs(comp: Components, images: list[str], pool: Executor | None = None, chunks: int = 1) -> dict:
    """`plugin._get_mm_inputs` over the images, split into `chunks` parts run on `pool`.

    Qwen2-VL's image processor treats each image on its own, so the concatenated parts equal one call over all.
    """
    plugin, processor = comp.template.mm_plugin, comp.processor
    if not images:
        return {}
    if pool is None or chunks <= 1 or len(images) < 2:
        return plugin._get_mm_inputs(images, [], [], processor)
    import torch

    size = -(-len(images) // chunks)
    parts = list(pool.map(lambda part: plugin._get_mm_inputs(part, [], [], processor),
                          [images[k : k + size] for k in range(0, len(images), size)]))
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def _padded_inputs(comp: Components, items: list[GenItem], grid_thw) -> tuple[Any, Any]:
    """Image-pad tokens expanded to each image's count, then left padding to the batch's longest row."""
    import torch

    counts = [int(g.prod()) // comp.merge_length for g in (grid_thw.cpu() if grid_thw is not None else [])]
    rows, k = [], 0
    for item in items:
        n = len(item.images)
        rows.append(expand_image_tokens(item.prompt_ids, comp.image_pad_id, counts[k : k + n]))
        k += n
    width = max(len(r) for r in rows)
    pad_id = comp.tokenizer.pad_token_id
    input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long)
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return input_ids, attention_mask


def prepare_batch(comp: Components, items: list[GenItem], dtype=None, pin: bool = False,
                  pool: Executor | None = None, chunks: int = 1, image_device=None) -> PreparedBatch:
    """Image preprocessing, image-token expansion and left padding for one batch.

    dtype converts pixel values here, as `.to(device, dtype)` would do on the CPU anyway; pin puts the tensors in
    page-locked memory so that the copy to the GPU can run asynchronously. With image_device, only the image
    decoding and max-pixel resize happen here (on `pool`); `finish_on_device` does the rest.
    """
    paths = [img for item in items for img in item.images]
    if image_device is not None:
        if pool is None or len(paths) < 2:
            images = regularized_images(comp, paths) if paths else []
        else:
            images = list(pool.map(lambda path: regularized_images(comp, [path])[0], paths))
        return PreparedBatch(items, images=images)
    mm = image_inputs(comp, paths, pool, chunks)
    input_ids, attention_mask = _padded_inputs(comp, items, mm.get("image_grid_thw"))
    mm = {key: mm[key] for key in ("pixel_values", "image_grid_thw") if key in mm}
    if dtype is not None and "pixel_values" in mm:
        mm["pixel_values"] = mm["pixel_values"].to(dtype)
    if pin:
        input_ids, attention_mask = input_ids.pin_memory(), attention_mask.pin_memory()
        mm = {key: t.pin_memory() for key, t in mm.items()}
    return PreparedBatch(items, input_ids, attention_mask, mm)


def finish_on_device(comp: Components, batch: PreparedBatch, device) -> PreparedBatch:
    """The image processor on `device` for a batch prepared with image_device (run where the model runs)."""
    if batch.input_ids is not None:
        return batch
    mm = pixel_inputs(comp, batch.images, device) if batch.images else {}
    batch.input_ids, batch.attention_mask = _padded_inputs(comp, batch.items, mm.get("image_grid_thw"))
    batch.mm, batch.images = mm, None
    return batch


def _without_bad_images(comp: Components, items: list[GenItem], batch: list[int], dtype, image_device,
                        on_error: Callable[[int, BaseException], None]) -> tuple[list[int], PreparedBatch | None]:
    good = []
    for i in batch:
        try:
            regularized_images(comp, items[i].images) if items[i].images else None
        except IMAGE_ERRORS as exc:
            on_error(i, exc)
        else:
            good.append(i)
    if not good:
        return [], None
    return good, prepare_batch(comp, [items[i] for i in good], dtype, False, None, 1, image_device)


def use_compiled_kernels(model) -> None:
    """--compile: the vision tower's attention as one varlen call per batch, its blocks compiled on CUDA (once).

    Off CUDA the same attention wiring runs uncompiled, with SDPA per image (what the CPU tests check).
    """
    if not getattr(model, "_mire_compiled", False):
        from .fast_vision import speed_up_vision_tower

        speed_up_vision_tower(model, compile_blocks=model.device.type == "cuda")
        model._mire_compiled = True


def decode_kwargs(compiled: bool) -> dict:
    """generate() options for --compile: a static KV cache, with which transformers decodes through a
    torch.compile'd forward (CUDA graphs) on CUDA; elsewhere the cache alone (same tokens, nothing compiled).

    Decoding a batch is otherwise bound by Python and kernel launches (~35 ms a token for 2B at batch 32 on an
    H100), not by the GPU.
    """
    return {"cache_implementation": "static"} if compiled else {}


def _to_device(t, device, dtype=None):
    return t.to(device, dtype=dtype, non_blocking=t.is_pinned())


def generate_prepared(model, comp: Components, batch: PreparedBatch, max_new_tokens: int, constraints=None,
                      min_new_tokens: int = 0, compiled: bool = False) -> list[str]:
    """Greedy answers for one prepared batch; `constraints` (AnswerConstraints) restricts each row to its task's answers.

    min_new_tokens (benchmarks only) fixes the output length so that timings compare like with like.
    """
    import torch

    batch = finish_on_device(comp, batch, model.device)
    tokenizer = comp.tokenizer
    width, pad_id = batch.width, tokenizer.pad_token_id
    stop_ids = comp.template.get_stop_token_ids(tokenizer)
    if compiled:
        use_compiled_kernels(model)
    kwargs = decode_kwargs(compiled)
    if batch.mm:
        kwargs["pixel_values"] = _to_device(batch.mm["pixel_values"], model.device, model.dtype)
        kwargs["image_grid_thw"] = _to_device(batch.mm["image_grid_thw"], model.device)
    if constraints is not None:
        from transformers import LogitsProcessorList

        from .constrained import GrammarLogitsProcessor, make_prefix_allowed_tokens_fn

        if constraints.answer_format == "label":
            tries = [constraints.tries[task] for task in batch.tasks]
            kwargs["prefix_allowed_tokens_fn"] = make_prefix_allowed_tokens_fn(tries, width, pad_id)
        else:
            grammars = [constraints.grammars[task] for task in batch.tasks]
            processor_ = GrammarLogitsProcessor(grammars, width, tokenizer, comp.stop_id, max_new_tokens)
            kwargs["logits_processor"] = LogitsProcessorList([processor_])
    input_ids = _to_device(batch.input_ids, model.device)
    kwargs.update(mrope_generate_kwargs(model, comp.processor, input_ids))  # training's image positions
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=_to_device(batch.attention_mask, model.device),
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens or None,
            do_sample=False,
            num_beams=1,
            eos_token_id=stop_ids,
            pad_token_id=pad_id,
            **kwargs,
        )
    return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)


def generate_batch(model, comp: Components, items: list[GenItem], max_new_tokens: int, constraints=None,
                   min_new_tokens: int = 0) -> list[str]:
    """One batch, prepared and generated in the calling thread."""
    return generate_prepared(model, comp, prepare_batch(comp, items), max_new_tokens, constraints, min_new_tokens)


def first_batch_size(batch_size: int, on_gpu: bool) -> int | None:
    """length_sorted_batches' `first` as generate_sorted uses it: on a GPU a small first batch gets it going."""
    return max(1, batch_size // 4) if on_gpu else None


def prefetched(comp: Components, items: list[GenItem], batches: list[list[int]], dtype, pin: bool, workers: int,
               image_device=None, on_error: Callable[[int, BaseException], None] | None = None,
               ) -> Iterator[tuple[list[int], PreparedBatch]]:
    """(indices, model inputs) per batch, batch k+1 prepared in a background thread (its images split over `workers`
    threads) while the caller generates batch k. With `image_device` the image processor's resize, normalization
    and patching are left to finish there (generate_prepared does it).
    on_error(index, exception), when given, receives each item whose images cannot be read (a truncated or broken
    file); the rest of its batch is kept. Without it such an error propagates."""
    with ThreadPoolExecutor(1, thread_name_prefix="prefetch") as prefetch, \
            ThreadPoolExecutor(workers, thread_name_prefix="images") as pool:

        def submit(batch):
            return prefetch.submit(prepare_batch, comp, [items[i] for i in batch], dtype, pin, pool, workers,
                                   image_device)

        pending = submit(batches[0]) if batches else None
        for k, batch in enumerate(batches):
            try:
                prepared = pending.result()
            except IMAGE_ERRORS:
                if on_error is None:
                    raise
                prepared = None
            pending = submit(batches[k + 1]) if k + 1 < len(batches) else None
            if prepared is None:  # one bad image spoils the batch: find it item by item, keep the others
                batch, prepared = _without_bad_images(comp, items, batch, dtype, image_device, on_error)
                if not batch:
                    continue
            yield batch, prepared


def generate_sorted(model, comp: Components, items: list[GenItem], lengths: Sequence[int], batch_size: int,
                    max_new_tokens: int, constraints=None, compiled: bool = False,
                    on_error: Callable[[int, BaseException], None] | None = None,
                    ) -> Iterator[tuple[list[int], list[str]]]:
    """(indices, answers) per length-sorted batch, while the next batch is prepared in the background (prefetched).

    Image decoding is CPU work that would otherwise leave the GPU idle between batches. On a GPU the image
    processor's resize, normalization and patching run there, just before generate (H100, 256 records: 15.0 s
    against 19.7 s with them on 8 CPU threads).
    compiled (--compile): varlen attention and compiled blocks in the vision tower, a compiled decode step (CUDA;
    the first batches pay for compiling). on_error: as prefetched's.
    (benchmarks/bench_infer.py runs the same pieces with its own knobs: fixed output length, image threads, where
    the image processor runs, time spent waiting.)
    """
    on_gpu = model.device.type == "cuda"
    batches = length_sorted_batches(lengths, batch_size, first=first_batch_size(batch_size, on_gpu))
    for batch, prepared in prefetched(comp, items, batches, model.dtype, on_gpu, default_image_workers(),
                                      model.device if on_gpu else None, on_error):
        yield batch, generate_prepared(model, comp, prepared, max_new_tokens, constraints, compiled=compiled)


def default_image_workers() -> int:
    return min(8, os.cpu_count() or 1)


class HfBackend(Backend):
    """transformers' generate on LLaMA-Factory's model loader (`--backend hf`)."""

    name = "hf"

    def generate(self, job: Job) -> None:
        from tqdm import tqdm

        from .answer import AnswerConstraints

        args, variant, comp = job.args, job.variant, job.comp
        model = load_hf_model(comp)
        constraints = (AnswerConstraints(comp.tokenizer, comp.stop_id, variant.answer_format, variant.label_position)
                       if args.constrained else None)
        items = [GenItem(ids, p.images, r.task) for r, p, ids in zip(job.records, job.plans, job.prompt_ids,
                                                                      strict=True)]
        with tqdm(total=len(items), desc="hf generate") as bar:

            def on_error(i: int, exc: BaseException) -> None:
                job.write([job.failed(i, image_failure(exc))])
                bar.update(1)

            for batch, predicts in generate_sorted(model, comp, items, [p.n_tokens for p in job.plans],
                                                   args.batch_size, args.max_new_tokens, constraints,
                                                   compiled=args.compile, on_error=on_error):
                job.write([job.row(i, pred) for i, pred in zip(batch, predicts, strict=True)])
                bar.update(len(batch))
