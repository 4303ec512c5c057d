"""The client side of every teacher tool (tools.distill, tools.extract_info --backend teacher, tools.generate): an
OpenAI-compatible server (vLLM, `llamafactory-cli api`, a hosted API) asked many requests at once, with retries,
images inline as Qwen2-VL-sized JPEG data URLs, and the API key kept out of everything written.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import email.utils
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

from .io import MireInputError

# Qwen2-VL: 14-pixel patches merged 2x2, so image sides are multiples of 28.
IMAGE_FACTOR = 28
DEFAULT_MIN_PIXELS = 4 * IMAGE_FACTOR * IMAGE_FACTOR
DEFAULT_MAX_PIXELS = 1280 * IMAGE_FACTOR * IMAGE_FACTOR
PLACEHOLDER_KEY = "EMPTY"  # vLLM and `llamafactory-cli api` accept any key when they were started without one
RETRYABLE_STATUS = frozenset({408, 409, 425, 429})
RETRY_AFTER_CAP_S = 600.0


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
    max_retries: int = _help("retries on 429/5xx/timeouts/connection errors", 5)
    backoff_base: float = _help("seconds before the first retry (doubles after each)", 1.0)
    backoff_max: float = _help("longest wait between retries", 60.0)
    concurrency: int = _help("requests in flight", 16)
    retry_failed: bool = _help("ask again for what failed before (its failed lines are replaced)", False)

    def check(self) -> list[str]:
        """What is wrong with these settings, as flag messages."""
        out = [f"--{name} must be at least 1" for name in ("concurrency", "max_tokens", "max_pixels")
               if getattr(self, name) < 1]
        if self.max_retries < 0 or self.timeout <= 0 or self.backoff_base < 0:
            out.append("--max_retries must be >= 0, --timeout > 0 and --backoff_base >= 0")
        return out


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


def retry_after_s(headers) -> float | None:
    """Seconds the server asked us to wait (retry-after-ms, or retry-after as seconds or an HTTP date)."""
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value:
        try:
            return min(float(value) / 1000.0, RETRY_AFTER_CAP_S)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return min(max(float(value), 0.0), RETRY_AFTER_CAP_S)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return min(max(when.timestamp() - time.time(), 0.0), RETRY_AFTER_CAP_S)


def backoff_s(attempt: int, base: float, cap: float, rng: random.Random = random._inst) -> float:
    """Exponential backoff with jitter: uniform in [d/2, d] with d = min(cap, base * 2**attempt)."""
    delay = min(cap, base * (2**attempt))
    return rng.uniform(delay / 2, delay)


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


async def complete_with_retries(client, request: dict, cfg: TeacherConfig) -> tuple[dict, int]:
    """The decoded response body and the number of attempts; TeacherError when retries are spent."""
    import openai

    from .teacher_reply import read_completion

    attempt = 0
    while True:
        retry_after = None
        try:
            # client.post, not chat.completions.create: create() type-walks and copies the whole prompt (about
            # 2 ms a request, a third of our CPU at 32 in flight); post keeps the client's auth and error types.
            response = await client.post("/chat/completions", cast_to=_response_type(), body=request)
            try:
                body = json.loads(response.content)
                read_completion(body)  # a body of another shape is a server fault: asked again like a 5xx
                return body, attempt + 1
            except (ValueError, UnicodeDecodeError, RecursionError) as exc:
                last = f"malformed response ({short(exc, 120)})"
        except openai.APIStatusError as exc:
            status = exc.status_code
            if _is_content_filter(exc):
                raise TeacherError(f"content_filter: HTTP {status}: {short(exc.message)}", refused=True) from None
            if status not in RETRYABLE_STATUS and status < 500:
                raise TeacherError(f"HTTP {status}: {short(exc.message)}") from None
            last = f"HTTP {status}: {short(exc.message, 160)}"
            retry_after = retry_after_s(exc.response.headers)
        except openai.APITimeoutError:
            last = f"timeout (no reply within {cfg.timeout:g}s)"
        except openai.APIConnectionError as exc:
            cause = exc.__cause__ or exc
            last = f"connection error ({type(cause).__name__}: {short(cause, 120)})"
        except openai.APIResponseValidationError as exc:
            last = f"malformed response ({short(exc, 120)})"
        if attempt >= cfg.max_retries:
            raise TeacherError(f"{last}; gave up after {attempt + 1} attempts")
        delay = retry_after if retry_after is not None else backoff_s(attempt, cfg.backoff_base, cfg.backoff_max)
        attempt += 1
        await asyncio.sleep(delay)


def make_client(cfg: TeacherConfig, api_key: str):
    import openai

    return openai.AsyncOpenAI(base_url=cfg.base_url, api_key=api_key, max_retries=0, timeout=cfg.timeout)


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
