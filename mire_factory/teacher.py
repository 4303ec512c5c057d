"""The client side of every teacher tool (tools.distill, tools.extract_info --backend teacher, tools.generate): an
OpenAI-compatible server (vLLM, `llamafactory-cli api`, a hosted API) asked many requests at once, with retries,
images inline as Qwen2-VL-sized JPEG data URLs, and the API key kept out of everything written.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import json
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from functools import lru_cache
from typing import Any, TypeVar

from .hparams import config_field
from .io import EXIT_FAILURES, MireInputError

# Qwen2-VL: 14-pixel patches merged 2x2, so image sides are multiples of 28.
IMAGE_FACTOR = 28
DEFAULT_MIN_PIXELS = 4 * IMAGE_FACTOR * IMAGE_FACTOR
DEFAULT_MAX_PIXELS = 1280 * IMAGE_FACTOR * IMAGE_FACTOR
PLACEHOLDER_KEY = "EMPTY"  # vLLM and `llamafactory-cli api` accept any key when they were started without one
# The statuses below 500 that the openai client retries (its _should_retry): failing with one means retries ran out.
CLIENT_RETRIED_STATUS = frozenset({408, 409, 429})
MALFORMED_BACKOFF_BASE_S, MALFORMED_BACKOFF_MAX_S = 0.5, 8.0


def _help(text: str, default):
    return field(default=default, metadata={"help": text})


@dataclass
class TeacherConfig:
    """How requests are sent; the same flags in every teacher tool (help texts for HfArgumentParser)."""

    base_url: str | None = _help("the server, e.g. http://127.0.0.1:8000/v1 (vLLM, llamafactory-cli api, a hosted "
                                 "API)", None)
    model: str | None = _help("model name sent to the server; part of the resume key", None)
    max_pixels: int = _help("images are resized as Qwen2-VL would, to at most this many pixels", DEFAULT_MAX_PIXELS)
    min_pixels: int = _help("and at least this many", DEFAULT_MIN_PIXELS)
    max_tokens: int = _help("longest reply", 512)
    temperature: float = _help("sampling temperature", 0.0)
    timeout: float = _help("seconds to wait for a reply", 120.0)
    max_retries: int = _help("retries (the openai client's: 408/409/429/5xx honouring Retry-After, timeouts, "
                             "connection errors; and malformed replies)", 5)
    concurrency: int = _help("requests in flight", 16)
    retry_failed: bool = _help("ask again for what failed before (its failed lines are replaced)", False)

    def check(self) -> list[str]:
        """What is wrong with these settings, as flag messages."""
        out = [f"--{name} must be at least 1" for name in ("concurrency", "max_tokens", "max_pixels")
               if getattr(self, name) < 1]
        if self.max_retries < 0 or self.timeout <= 0:
            out.append("--max_retries must be >= 0 and --timeout > 0")
        return out


@dataclass(kw_only=True)
class TeacherRunFields:
    """The flags of a teacher tool's run besides TeacherConfig's: the same in tools.distill, tools.extract_info and
    tools.generate."""

    api_key_env: str | None = _help("environment variable holding the teacher's API key (default OPENAI_API_KEY)",
                                    None)
    dry_run: bool = _help("print the first request (images elided) and stop", False)
    progress: bool = _help("show a progress bar", True)
    config: str | None = config_field()


def print_dry_run(request: dict, count: str) -> int:
    """--dry_run: the request as it would be sent, images elided (stdout), and what the run would send (stderr)."""
    print(json.dumps(elide_images(request), ensure_ascii=False, indent=2))
    print(f"dry run: {count}", file=sys.stderr)
    return 0


def report_failures(summary: RunSummary, tool: str, what: str = "requests") -> int:
    """The run's failures (stderr); the tool's exit code: 0, or 3 with failed lines left."""
    failures = failure_summary(summary, tool=tool, what=what)
    if failures:
        print(failures, file=sys.stderr)
        return EXIT_FAILURES
    return 0


def report_run(summary: RunSummary, output_file: str | os.PathLike, tool: str, what: str = "requests") -> int:
    """The run's summary (stdout), then report_failures."""
    print(format_summary(summary, output_file, what=what))
    return report_failures(summary, tool, what)


def api_key_from_env(name: str | None) -> str:
    """The key from `name` (which must be set), else $OPENAI_API_KEY, else the placeholder local servers accept."""
    if name:
        if not os.environ.get(name):
            raise MireInputError(f"--api_key_env: environment variable {name} is not set")
        return os.environ[name]
    return os.environ.get("OPENAI_API_KEY") or PLACEHOLDER_KEY


# ---------------------------------------------------------------- images


@lru_cache(maxsize=1)
def _smart_resize():
    """Qwen's own smart_resize (qwen-vl-utils, else transformers); imported late because both pull in torch."""
    try:
        from qwen_vl_utils.vision_process import smart_resize
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
    return smart_resize


def image_data_url(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS,
                   min_pixels: int = DEFAULT_MIN_PIXELS) -> str:
    """The image resized as Qwen2-VL would (sides multiples of 28, pixels within bounds), as a JPEG data URL."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        if img.mode in ("RGBA", "LA", "P"):
            rgba = img.convert("RGBA")
            img = Image.new("RGB", rgba.size, (255, 255, 255))
            img.paste(rgba, mask=rgba.getchannel("A"))
        else:
            img = img.convert("RGB")
        height, width = _smart_resize()(img.height, img.width, factor=IMAGE_FACTOR, min_pixels=min_pixels,
                                        max_pixels=max_pixels)
        if (width, height) != img.size:
            img = img.resize((width, height), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def elide_images(request: dict) -> dict:
    """A copy fit for printing: each data URL replaced by its size."""
    shown = copy.deepcopy(request)
    for message in shown["messages"]:
        for part in message["content"] if isinstance(message["content"], list) else []:
            if part.get("type") == "image_url":
                url = part["image_url"]["url"]
                head, _, data = url.partition(",")
                part["image_url"]["url"] = f"{head},<{len(data)} base64 characters elided>"
    return shown


# ---------------------------------------------------------------- one request, retried


class TeacherError(Exception):
    """A request that will not succeed (retries spent or not retryable); `refused` when the provider filtered it."""

    def __init__(self, message: str, refused: bool = False):
        super().__init__(message)
        self.refused = refused


def malformed_backoff_s(retry: int, rng: random.Random = random._inst) -> float:
    """The wait before asking again after a malformed reply: the openai client's own schedule for the faults it
    retries (0.5 s doubling to 8 s, less up to a quarter of jitter), which it keeps private."""
    return min(MALFORMED_BACKOFF_BASE_S * 2**retry, MALFORMED_BACKOFF_MAX_S) * (1 - 0.25 * rng.random())


def _is_content_filter(exc) -> bool:
    body = getattr(exc, "body", None)
    text = json.dumps(body) if isinstance(body, dict | list) else str(body or "")
    return "content_filter" in text or "content_policy" in text


def short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@lru_cache(maxsize=1)
def _response_type() -> type:
    try:  # openai >= 3 is built on httpx2, earlier versions on httpx
        import httpx2 as httpx
    except ImportError:
        import httpx
    return httpx.Response


def _tries(request) -> int:
    """Attempts the client made for one call: it numbers its retries in a header of every request it sends."""
    try:
        return int(request.headers.get("x-stainless-retry-count", 0)) + 1
    except (AttributeError, ValueError):
        return 1


def _attempts(n: int) -> str:
    return "1 attempt" if n == 1 else f"{n} attempts"


async def complete_with_retries(client, request: dict, cfg: TeacherConfig) -> tuple[dict, int]:
    """The decoded response body and the number of attempts; TeacherError when retries are spent.

    The openai client (make_client) retries every fault it can see, from cfg.max_retries: 408/409/429/5xx (honouring
    Retry-After), timeouts and connection errors, with jittered exponential backoff. A 200 whose body is not a chat
    completion (cut JSON, valid JSON of another shape: broken proxies and overloaded servers send them) is a success
    to the client, so this loop asks again for those, from the same budget of attempts."""
    import openai

    from .teacher_reply import read_completion

    attempts, malformed = 0, 0
    while True:
        try:
            # client.post, not chat.completions.create: create() type-walks and copies the whole prompt (about
            # 2 ms a request, a third of our CPU at 32 in flight); post keeps the client's retries, auth and errors.
            response = await client.post("/chat/completions", cast_to=_response_type(), body=request,
                                         options={"max_retries": cfg.max_retries - attempts})
        except openai.APIStatusError as exc:
            attempts += _tries(exc.request)
            status = exc.status_code
            if _is_content_filter(exc):
                raise TeacherError(f"content_filter: HTTP {status}: {short(exc.message)}", refused=True) from None
            if status in CLIENT_RETRIED_STATUS or status >= 500:
                raise TeacherError(f"HTTP {status}: {short(exc.message, 160)}; gave up after {_attempts(attempts)}"
                                   ) from None
            raise TeacherError(f"HTTP {status}: {short(exc.message)}") from None
        except openai.APITimeoutError as exc:
            attempts += _tries(exc.request)
            raise TeacherError(f"timeout (no reply within {cfg.timeout:g}s); gave up after {_attempts(attempts)}"
                               ) from None
        except openai.APIConnectionError as exc:
            attempts += _tries(exc.request)
            cause = exc.__cause__ or exc
            raise TeacherError(f"connection error ({type(cause).__name__}: {short(cause, 120)}); gave up after "
                               f"{_attempts(attempts)}") from None
        attempts += _tries(response.request)
        try:
            body = json.loads(response.content)
            read_completion(body)  # a body of another shape is a server fault too
            return body, attempts
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            last = f"malformed response ({short(exc, 120)})"
        if attempts > cfg.max_retries:
            raise TeacherError(f"{last}; gave up after {_attempts(attempts)}")
        await asyncio.sleep(malformed_backoff_s(malformed))
        malformed += 1


def make_client(cfg: TeacherConfig, api_key: str):
    import openai

    return openai.AsyncOpenAI(base_url=cfg.base_url, api_key=api_key, max_retries=cfg.max_retries, timeout=cfg.timeout)


# ---------------------------------------------------------------- secrets


def scrub(text: str | None, secret: str | None) -> str | None:
    if text and secret and secret != PLACEHOLDER_KEY and secret in text:
        return text.replace(secret, "***")
    return text


def _scrub_value(value: Any, secret: str | None) -> Any:
    if isinstance(value, str):
        return scrub(value, secret)
    if isinstance(value, dict):
        return {scrub(k, secret) if isinstance(k, str) else k: _scrub_value(v, secret) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub_value(v, secret) for v in value]
    return value


R = TypeVar("R")


def scrub_record(rec: R, secret: str | None) -> R:
    """Every text field (nested in dicts and lists too) without the key: a server may echo the Authorization value
    anywhere (a reason, a label, parsed JSON, the raw reply)."""
    if not secret or secret == PLACEHOLDER_KEY or not is_dataclass(rec):
        return rec
    for f in fields(rec):
        setattr(rec, f.name, _scrub_value(getattr(rec, f.name), secret))
    return rec


# ---------------------------------------------------------------- many requests


@dataclass
class Plan:
    todo: list
    skipped_done: int = 0  # ok or refused already
    skipped_failed: int = 0  # failed before and not retried (pass --retry_failed)
    retrying: set = field(default_factory=set)


@dataclass
class RunSummary:
    requests: int = 0
    statuses: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    elapsed_s: float = 0.0
    plan: Plan | None = None
    removed_failed: int = 0
    repaired_bytes: int = 0

    def count(self, row) -> None:
        """Adds one written row (with .status, .error and .usage) to the totals."""
        self.requests += 1
        self.statuses[row.status] += 1
        if row.error:
            self.errors[row.error.split(":")[0].split(" (")[0]] += 1
        usage = getattr(row, "usage", None) or {}
        self.prompt_tokens += usage.get("prompt_tokens", 0)
        self.completion_tokens += usage.get("completion_tokens", 0)


J = TypeVar("J")


async def run_jobs(jobs: Sequence[J], answer: Callable[[J], Awaitable[R | list[R]]], write: Callable[[R], None],
                   summary: RunSummary, concurrency: int, desc: str, progress: bool = True) -> RunSummary:
    """Answers every job with at most `concurrency` in flight; each row (or list of rows) `answer` returns is written
    as soon as it is ready (`write`, e.g. an AppendLog's append) and counted, with a progress bar of the statuses and
    tokens (one step per job)."""
    from tqdm import tqdm

    work = iter(jobs)
    start = time.perf_counter()
    bar = tqdm(total=len(jobs), unit="req", desc=desc, file=sys.stderr, disable=not progress, dynamic_ncols=True,
               mininterval=0.5)

    async def worker() -> None:
        for job in work:
            answered = await answer(job)
            for row in answered if isinstance(answered, list) else [answered]:
                write(row)
                summary.count(row)
            st = summary.statuses
            bar.set_postfix(ok=st["ok"], refused=st["refused"], failed=st["failed"],
                            tokens=summary.prompt_tokens + summary.completion_tokens, refresh=False)
            bar.update(1)

    try:
        await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(jobs))))))
    finally:
        bar.close()
        summary.elapsed_s = time.perf_counter() - start
    return summary


def format_summary(summary: RunSummary, output_file: str | os.PathLike, what: str = "requests") -> str:
    plan = summary.plan
    lines = []
    if summary.repaired_bytes:
        lines.append(f"dropped an unfinished last line ({summary.repaired_bytes} bytes) left by an interrupted run")
    if summary.removed_failed:
        lines.append(f"removed {summary.removed_failed} failed lines to retry them")
    rate = summary.requests / summary.elapsed_s if summary.elapsed_s > 0 else 0.0
    st = summary.statuses
    tokens = (f"; tokens {summary.prompt_tokens} prompt + {summary.completion_tokens} completion"
              if summary.prompt_tokens or summary.completion_tokens or what == "requests" else "")
    unit = "req" if what == "requests" else what
    lines.append(f"{summary.requests} {what} in {summary.elapsed_s:.1f}s ({rate:.1f} {unit}/s): ok {st['ok']}, refused "
                 f"{st['refused']}, failed {st['failed']}{tokens} -> {output_file}")
    if getattr(plan, "copies", None):
        lines.append(f"copied {len(plan.copies)} done before under another name (same bytes)")
    if plan is not None and (plan.skipped_done or plan.skipped_failed):
        extra = f", {plan.skipped_failed} failed before (rerun with --retry_failed)" if plan.skipped_failed else ""
        lines.append(f"skipped {plan.skipped_done} already done{extra}")
    for error, n in summary.errors.most_common(8):
        lines.append(f"  {n} x {error}")
    return "\n".join(lines)


def failure_summary(summary: RunSummary, tool: str = "distill", what: str = "requests") -> str:
    """For stderr when the file still holds failed lines for this run's keys (exit 3); "" when none."""
    plan = summary.plan
    now, before = summary.statuses["failed"], plan.skipped_failed if plan is not None else 0
    if not now and not before:
        return ""
    parts = []
    if now:
        parts.append(f"{now} of {summary.requests} {what} of this run failed")
    if before:
        parts.append(f"{before} failed in an earlier run and were not asked again")
    lines = [f"{tool} finished with failures: {'; '.join(parts)}. Each failed line says why; rerun with "
             "--retry_failed to ask them again."]
    lines += [f"  {n} x {error}" for error, n in summary.errors.most_common(5) if error]
    return "\n".join(lines)
