"""The part that calls vLLM (imported only with --backend vllm), written against vLLM 0.24.0.

vLLM's offline `LLM.generate` runs the multimodal processor of every prompt serially in the calling process before
and while the GPU works, and returns nothing until the whole list is done. This drives vLLM's async engine
(AsyncLLM, the engine behind `vllm serve`) from one event loop instead:
- images are decoded and resized (mm_plugin's own code) on a pool of threads, so that vLLM gets them at the size
  training gave them;
- vLLM's processor runs on its renderer threads (`renderer_num_workers`), in parallel;
- a bounded number of requests is in flight, each answer is handed back as soon as it is finished: progress and the
  resumable output file move per record, and a kill loses only what was in flight.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..io import MireInputError
from ..records import IMAGE_ERRORS, image_error
from .backends import Backend, Job
from .vllm_inputs import (
    engine_kwargs,
    image_uuids,
    prompt_input,
    regularized_images,
    sampling_kwargs,
    vllm_engine_args,
)


@dataclass
class VllmRequest:
    key: int  # the caller's index
    prompt_ids: list[int]  # one image-pad token per image
    images: list[str]  # paths
    params: object  # vllm.SamplingParams


@dataclass
class VllmOutput:
    key: int
    text: str
    prompt_token_ids: list[int]  # as vLLM reports them: image placeholders expanded
    n_generated: int
    error: str | None = None  # the record could not be run (an image that does not decode); text is then ""


@dataclass
class RunStats:
    """Where the wall time went (seconds): summed over requests, except `wall_s`."""

    wall_s: float = 0.0
    images_s: float = 0.0  # decoding and resizing (our threads)
    render_s: float = 0.0  # vLLM's multimodal processor (its renderer threads)
    engine_s: float = 0.0  # from handing the request to the engine to its last token
    requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0

    def summary(self) -> dict:
        n = max(self.requests, 1)
        return {"wall_s": round(self.wall_s, 3), "requests": self.requests, "prompt_tokens": self.prompt_tokens,
                "generated_tokens": self.generated_tokens,
                "per_request_ms": {"images": round(1000 * self.images_s / n, 2),
                                   "vllm_processor": round(1000 * self.render_s / n, 2),
                                   "engine": round(1000 * self.engine_s / n, 2)}}


def structured_outputs(fields: dict | None):
    if not fields:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    return StructuredOutputsParams(**fields)


def sampling_params(fields: dict):
    """SamplingParams from vllm_inputs.sampling_kwargs' fields."""
    from vllm import SamplingParams

    fields = dict(fields)
    fields["structured_outputs"] = structured_outputs(fields.pop("structured_outputs", None))
    return SamplingParams(**fields)


class FirstAlone:
    """Runs the first awaited call alone; the calls after it run concurrently.

    vLLM builds its HF processor lazily, through an unlocked functools.lru_cache, when a renderer thread serves its
    first request: N threads starting together build N processors, each deep-copying the 151,643-token tokenizer
    under the GIL. On the CPU, 16 concurrent first renders took 309 s; 0.83 s once one had run alone
    (BENCHMARKS.md, vLLM). On the H200 the same herd left 120 records at 0/120 for 6 minutes."""

    def __init__(self):
        self.done = False
        self.lock = asyncio.Lock()

    async def __call__(self, make_awaitable: Callable):
        if not self.done:
            async with self.lock:
                if not self.done:
                    result = await make_awaitable()
                    self.done = True
                    return result
        return await make_awaitable()


async def render_request(renderer, model_config, loop, pool, images_fn, req: VllmRequest, stats: RunStats):
    """vLLM's engine input for one request, as `vllm serve` makes it: images_fn(paths) -> (images, uuids) on `pool`,
    then the renderer (vLLM's multimodal processor, on its own threads)."""
    from vllm.renderers.inputs.preprocess import parse_model_prompt

    start = time.perf_counter()
    images, uuids = (await loop.run_in_executor(pool, images_fn, req.images)) if req.images else ([], [])
    ready = time.perf_counter()
    prompt = parse_model_prompt(model_config, prompt_input(req.prompt_ids, images, uuids))
    (engine_input,) = await renderer.render_cmpl_async([prompt])
    stats.images_s += ready - start
    stats.render_s += time.perf_counter() - ready
    return engine_input


class VllmEngine:
    """One AsyncLLM and the event loop it lives on; `run` may be called several times (benchmarks)."""

    def __init__(self, engine_kwargs: dict, adapter: str | None = None, image_workers: int = 8,
                 image_max_pixels: int = 768 * 768, image_min_pixels: int = 32 * 32, plugin=None):
        self.loop = asyncio.new_event_loop()
        self.adapter = adapter
        self.plugin = plugin
        self.image_max_pixels, self.image_min_pixels = image_max_pixels, image_min_pixels
        self.first_render = FirstAlone()
        start = time.perf_counter()
        self.engine = self.loop.run_until_complete(self._make(engine_kwargs))
        self.start_s = time.perf_counter() - start
        # after the engine's processes have started: no thread of ours is alive while vLLM forks
        self.pool = ThreadPoolExecutor(image_workers, thread_name_prefix="images")
        self._lora = None
        if adapter:
            from vllm.lora.request import LoRARequest

            self._lora = LoRARequest("adapter", 1, adapter)

    @staticmethod
    async def _make(kwargs: dict):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        # LLM_CLASS: the batch-inference defaults (larger max_num_batched_tokens and max_num_seqs than a server's)
        return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs), usage_context=UsageContext.LLM_CLASS)

    def images(self, paths: list[str]) -> tuple[list, list[str]]:
        return (regularized_images(self.plugin, paths, self.image_max_pixels, self.image_min_pixels),
                image_uuids(paths, self.image_max_pixels, self.image_min_pixels))

    async def render(self, req: VllmRequest, stats: RunStats):
        """The engine input of one request: our image step on our threads, then vLLM's processor on its own."""
        return await self.first_render(lambda: render_request(self.engine.renderer, self.engine.model_config,
                                                              self.loop, self.pool, self.images, req, stats))

    def render_all(self, requests: Sequence[VllmRequest]) -> tuple[list, RunStats]:
        """Every request's engine input, rendered as `run` renders them (benchmarks: phases, identity checks)."""
        stats = RunStats()

        async def go():
            return await asyncio.gather(*(self.render(req, stats) for req in requests))

        start = time.perf_counter()
        inputs = self.loop.run_until_complete(go())
        stats.wall_s = time.perf_counter() - start
        stats.requests = len(requests)
        return inputs, stats

    def reset_caches(self) -> None:
        """Prefix and encoder caches emptied (benchmarks: each timed run starts cold)."""

        async def go():
            await self.engine.reset_prefix_cache()
            await self.engine.reset_encoder_cache()

        self.loop.run_until_complete(go())

    async def _one(self, req: VllmRequest, stats: RunStats, limit: asyncio.Semaphore, rendered=None) -> VllmOutput:
        async with limit:
            try:
                engine_input = rendered if rendered is not None else await self.render(req, stats)
            except IMAGE_ERRORS as exc:  # one bad image fails its record, not the run
                return VllmOutput(req.key, "", [], 0, error=f"cannot read an image of the record ({image_error(exc)})")
            start = time.perf_counter()
            final = None
            async for out in self.engine.generate(engine_input, req.params, request_id=f"r{req.key}",
                                                  lora_request=self._lora):
                final = out
            stats.engine_s += time.perf_counter() - start
        completion = final.outputs[0]
        stats.requests += 1
        stats.prompt_tokens += len(final.prompt_token_ids)
        stats.generated_tokens += len(completion.token_ids)
        return VllmOutput(req.key, completion.text, list(final.prompt_token_ids), len(completion.token_ids))

    async def _run(self, requests: Sequence[VllmRequest], on_output: Callable[[VllmOutput], None],
                   max_in_flight: int, stats: RunStats, rendered: Sequence | None) -> None:
        limit = asyncio.Semaphore(max_in_flight)
        # a shallow copy of each pre-rendered input: the engine may add keys to the dict it is given
        tasks = [asyncio.ensure_future(self._one(req, stats, limit, dict(rendered[k]) if rendered else None))
                 for k, req in enumerate(requests)]
        try:
            for next_done in asyncio.as_completed(tasks):
                on_output(await next_done)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def run(self, requests: Sequence[VllmRequest], on_output: Callable[[VllmOutput], None],
            max_in_flight: int = 512, rendered: Sequence | None = None) -> RunStats:
        """Generates every request, calling on_output(answer) as each one finishes (completion order).

        rendered (benchmarks): the requests' engine inputs from render_all, so that only the engine is timed.
        """
        from vllm.sampling_params import RequestOutputKind

        for req in requests:
            req.params.output_kind = RequestOutputKind.FINAL_ONLY
        stats = RunStats()
        start = time.perf_counter()
        self.loop.run_until_complete(self._run(requests, on_output, max_in_flight, stats, rendered))
        stats.wall_s = time.perf_counter() - start
        return stats

    def close(self) -> None:
        self.engine.shutdown()
        self.pool.shutdown(wait=False)
        left = asyncio.all_tasks(self.loop)  # the engine's output handler, if shutdown left it pending
        for task in left:
            task.cancel()
        self.loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        self.loop.close()


class VllmBackend(Backend):
    """vLLM's async engine (`--backend vllm`): every record through one engine."""

    name = "vllm"

    def check_args(self, args) -> None:
        if args.compile:
            raise MireInputError("--compile is for the hf backend (vLLM compiles its own graphs)")

    def generate(self, job: Job) -> None:
        """Each answer is written (in batches of at most a second's worth) as soon as it is finished, so progress
        is per record and a kill loses only the requests in flight."""
        from tqdm import tqdm

        args, variant, comp = job.args, job.variant, job.comp
        kwargs = engine_kwargs(args.model_name_or_path, job.plans, args.cutoff_len, args.max_new_tokens,
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
            requests = [VllmRequest(i, job.prompt_ids[i], job.plans[i].images, params[r.task])
                        for i, r in enumerate(job.records)]
            pending: list[dict] = []
            last_write = time.monotonic()
            with tqdm(total=len(requests), desc="vllm generate") as bar:

                def on_output(answer: VllmOutput) -> None:
                    nonlocal last_write
                    i = answer.key
                    pending.append(job.failed(i, answer.error) if answer.error else job.row(i, answer.text))
                    bar.update(1)
                    if len(pending) >= 256 or time.monotonic() - last_write > 1.0:
                        job.write(pending)
                        pending.clear()
                        last_write = time.monotonic()

                try:
                    engine.run(requests, on_output, args.vllm_max_in_flight)
                finally:
                    if pending:
                        job.write(pending)
        finally:
            engine.close()
