"""Teacher distillation: requests to an OpenAI-compatible server, retries, and a resumable reasons file.

The output file is an append-only log of ReasonRecord lines, one per (record id, mode, model). Each line is written
with a single write() and fsync'd, so a kill loses at most the requests in flight and never a finished answer that
was paid for. A rerun skips every key already present with status ok or refused; failed keys are skipped too unless
`retry_failed`, in which case their old lines are removed (atomic rewrite) before they are asked again, so the file
never holds a key twice.
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
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path

from .content import to_content_parts
from .io import MireInputError, numbered_jsonl, output_lock, problem, write_text_atomic
from .prompts import teacher_prompt
from .reasons import ReasonRecord, reason_from_dict
from .records import MireRecord
from .teacher_reply import parse_reply, read_completion, refusal_reason

# Qwen2-VL: 14-pixel patches merged 2x2, so image sides are multiples of 28.
IMAGE_FACTOR = 28
DEFAULT_MIN_PIXELS = 4 * IMAGE_FACTOR * IMAGE_FACTOR
DEFAULT_MAX_PIXELS = 1280 * IMAGE_FACTOR * IMAGE_FACTOR
PLACEHOLDER_KEY = "EMPTY"  # vLLM and `llamafactory-cli api` accept any key when they were started without one
RETRYABLE_STATUS = frozenset({408, 409, 425, 429})
RETRY_AFTER_CAP_S = 600.0
LINE_START = b'{"id": '  # how every line of a reasons file begins (ReasonRecord.to_json)


@dataclass
class DistillConfig:
    base_url: str
    model: str
    modes: list[int]
    max_chars: int = 100
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_tokens: int = 512
    temperature: float = 0.0
    timeout: float = 120.0
    max_retries: int = 5
    backoff_base: float = 1.0  # first retry waits about this long, doubling after each failure
    backoff_max: float = 60.0
    concurrency: int = 16
    retry_failed: bool = False


# ---------------------------------------------------------------- requests


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


def build_messages(record: MireRecord, image_dir: str | os.PathLike, mode: int, max_chars: int = 100,
                   max_pixels: int = DEFAULT_MAX_PIXELS, min_pixels: int = DEFAULT_MIN_PIXELS) -> list[dict]:
    """One user turn: the instruction with each image inline at its <image> position, then the teacher prompt."""
    content: list[dict] = []
    for part in to_content_parts(record, image_dir):
        if part["type"] == "text":
            content.append({"type": "text", "text": part["text"]})
        else:
            url = image_data_url(part["image"], max_pixels=max_pixels, min_pixels=min_pixels)
            content.append({"type": "image_url", "image_url": {"url": url}})
    prompt = teacher_prompt(mode, record.task, record.output, max_chars)
    if content and content[-1]["type"] == "text":
        content[-1]["text"] = content[-1]["text"].rstrip("\n") + "\n" + prompt
    else:
        content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


def build_request(record: MireRecord, image_dir: str | os.PathLike, mode: int, cfg: DistillConfig) -> dict:
    return {
        "model": cfg.model,
        "messages": build_messages(record, image_dir, mode, cfg.max_chars, cfg.max_pixels, cfg.min_pixels),
        "max_tokens": cfg.max_tokens,
        "temperature": cfg.temperature,
    }


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


def check_modes(records: list[MireRecord], modes: Iterable[int], file: str | os.PathLike) -> None:
    """Modes 2 and 3 give the teacher the gold label: every record needs one."""
    if any(m not in (1, 2, 3) for m in modes):
        raise MireInputError(f"--mode: expected 1, 2 or 3, got {list(modes)}")
    if any(m in (2, 3) for m in modes):
        missing = [problem(file, r.id, "output", "modes 2 and 3 need the gold label") for r in records if not r.has_label]
        if missing:
            raise MireInputError(missing)


# ---------------------------------------------------------------- the reasons file


class ReasonsLog:
    """The append-only reasons file: load (repairing a line cut by a kill), drop keys atomically, append + fsync."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.repaired_bytes = 0

    def load(self, repair: bool = True) -> list[ReasonRecord]:
        """The file's lines. A file that is not a reasons file is refused (MireInputError) before anything changes:
        distill appends only to its own files. `repair` cuts an unfinished last line left by a kill."""
        if not self.path.exists():
            return []
        if self.path.is_dir():
            raise MireInputError(problem(self.path, None, None, "is a directory, expected a reasons file"))
        data = self.path.read_bytes()
        keep = data.rfind(b"\n") + 1 if data and not data.endswith(b"\n") else len(data)
        tail = data[keep:]
        # A kill during write() can only leave the start of one of our lines, which all begin the same way.
        if tail and not (tail.startswith(LINE_START) or LINE_START.startswith(tail)):
            raise self._not_ours(f"its last line ({len(tail)} bytes) is not a reasons line cut by a kill")
        try:
            text = data[:keep].decode("utf-8")
            rows = [reason_from_dict(row, self.path, k) for k, row in numbered_jsonl(text, self.path)]
        except UnicodeDecodeError as exc:
            raise self._not_ours(f"not UTF-8 text at byte {exc.start}") from None
        except MireInputError as exc:
            raise self._not_ours(exc.lines[0].removeprefix(f"{self.path}: ")) from None
        if tail and repair:
            self.repaired_bytes = len(tail)
            os.truncate(self.path, keep)
        return rows

    def _not_ours(self, why: str) -> MireInputError:
        return MireInputError(problem(self.path, None, None, f"not a reasons file of tools.distill ({why}); distill "
                                      "appends only to a reasons file or a new or empty one: choose another "
                                      "--output_file"))

    def rewrite_without(self, drop: set[tuple[str, int, str]], kinds: tuple[str, ...] = ("failed",)) -> int:
        """Atomically removes the lines of `drop` keys whose status is in `kinds`; returns how many went."""
        if not drop or not self.path.exists():
            return 0
        kept, removed = [], 0
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                if (row["id"], row["mode"], row["model"]) in drop and row["status"] in kinds:
                    removed += 1
                    continue
                kept.append(line + "\n")
        if removed:
            write_text_atomic(self.path, "".join(kept))
        return removed

    def __enter__(self) -> ReasonsLog:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._dirty = threading.Event()
        self._closing = False
        self._flusher = threading.Thread(target=self._flush_loop, name="reasons-fsync", daemon=True)
        self._flusher.start()
        return self

    def __exit__(self, *exc) -> None:
        self._closing = True
        self._dirty.set()
        self._flusher.join()
        os.fsync(self._fd)
        os.close(self._fd)

    def _flush_loop(self) -> None:
        # Group commit: one fsync covers every line written since the last one, off the event loop (an fsync
        # takes milliseconds, far longer than a write; doing it inline capped throughput).
        while not self._closing:
            self._dirty.wait()
            self._dirty.clear()
            os.fsync(self._fd)

    def append(self, rec: ReasonRecord) -> None:
        """The line is in the kernel when this returns (a SIGKILL cannot lose it); on disk within one fsync."""
        data = (rec.to_json() + "\n").encode("utf-8")
        while data:  # one write() for a regular file in practice; the loop covers a short write
            data = data[os.write(self._fd, data):]
        self._dirty.set()


@dataclass
class Plan:
    todo: list[tuple[MireRecord, int]]
    skipped_done: int = 0  # ok or refused already
    skipped_failed: int = 0  # failed before and not retried (pass --retry_failed)
    retrying: set[tuple[str, int, str]] = field(default_factory=set)


def plan_work(records: list[MireRecord], modes: list[int], model: str, existing: list[ReasonRecord],
              retry_failed: bool = False) -> Plan:
    done = {r.key for r in existing if r.status in ("ok", "refused")}
    failed = {r.key for r in existing if r.status == "failed"} - done
    plan = Plan(todo=[])
    for record in records:
        for mode in modes:
            key = (record.id, mode, model)
            if key in done:
                plan.skipped_done += 1
            elif key in failed and not retry_failed:
                plan.skipped_failed += 1
            else:
                if key in failed:
                    plan.retrying.add(key)
                plan.todo.append((record, mode))
    return plan


# ---------------------------------------------------------------- calling the teacher


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


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@lru_cache(maxsize=1)
def _response_type() -> type:
    try:  # openai >= 3 is built on httpx2, earlier versions on httpx
        import httpx2 as httpx
    except ImportError:
        import httpx
    return httpx.Response


async def complete_with_retries(client, request: dict, cfg: DistillConfig) -> tuple[dict, int]:
    """The decoded response body and the number of attempts; TeacherError when retries are spent."""
    import openai

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
                last = f"malformed response ({_short(exc, 120)})"
        except openai.APIStatusError as exc:
            status = exc.status_code
            if _is_content_filter(exc):
                raise TeacherError(f"content_filter: HTTP {status}: {_short(exc.message)}", refused=True) from None
            if status not in RETRYABLE_STATUS and status < 500:
                raise TeacherError(f"HTTP {status}: {_short(exc.message)}") from None
            last = f"HTTP {status}: {_short(exc.message, 160)}"
            retry_after = retry_after_s(exc.response.headers)
        except openai.APITimeoutError:
            last = f"timeout (no reply within {cfg.timeout:g}s)"
        except openai.APIConnectionError as exc:
            cause = exc.__cause__ or exc
            last = f"connection error ({type(cause).__name__}: {_short(cause, 120)})"
        except openai.APIResponseValidationError as exc:
            last = f"malformed response ({_short(exc, 120)})"
        if attempt >= cfg.max_retries:
            raise TeacherError(f"{last}; gave up after {attempt + 1} attempts")
        delay = retry_after if retry_after is not None else backoff_s(attempt, cfg.backoff_base, cfg.backoff_max)
        attempt += 1
        await asyncio.sleep(delay)


def reason_from_response(body: dict, record: MireRecord, mode: int, model: str) -> ReasonRecord:
    rec = ReasonRecord(id=record.id, mode=mode, model=model, status="ok", gold=record.output, task=record.task)
    try:
        reply = read_completion(body)
    except ValueError as exc:
        rec.status, rec.error = "failed", f"malformed response ({_short(exc, 120)})"
        return rec
    rec.raw, rec.usage = reply.text, reply.usage
    refused = refusal_reason(reply.text, reply.finish_reason, reply.refusal)
    if refused:
        rec.status, rec.error = "refused", refused
        return rec
    parsed = parse_reply(reply.text, record.task)
    rec.reason, rec.label = parsed.reason, parsed.label
    if not parsed.ok:
        rec.status = "failed"
        cut = "; the reply was cut at max_tokens" if reply.finish_reason == "length" else ""
        rec.error = parsed.error + cut
    return rec


# ---------------------------------------------------------------- the run


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


def scrub(text: str | None, secret: str | None) -> str | None:
    if text and secret and secret != PLACEHOLDER_KEY and secret in text:
        return text.replace(secret, "***")
    return text


def scrub_record(rec: ReasonRecord, secret: str | None) -> ReasonRecord:
    """Every text field without the key: a server may echo the Authorization value anywhere (reason, label, raw)."""
    for f in fields(rec):
        value = getattr(rec, f.name)
        if isinstance(value, str):
            setattr(rec, f.name, scrub(value, secret))
    return rec


def make_client(cfg: DistillConfig, api_key: str):
    import openai

    return openai.AsyncOpenAI(base_url=cfg.base_url, api_key=api_key, max_retries=0, timeout=cfg.timeout)


async def run_distill(records: list[MireRecord], image_dir: str | os.PathLike, cfg: DistillConfig,
                      output_file: str | os.PathLike, api_key: str = PLACEHOLDER_KEY, progress: bool = True,
                      client=None) -> RunSummary:
    log = ReasonsLog(output_file)
    log.load(repair=False)  # refuses a file that is not ours before even a lock file is created beside it
    with output_lock(output_file, what="another tools.distill is writing it"):
        return await _run_locked(log, records, image_dir, cfg, api_key, progress, client)


async def _run_locked(log: ReasonsLog, records: list[MireRecord], image_dir: str | os.PathLike, cfg: DistillConfig,
                      api_key: str, progress: bool, client) -> RunSummary:
    from tqdm import tqdm

    existing = log.load()
    plan = plan_work(records, cfg.modes, cfg.model, existing, cfg.retry_failed)
    summary = RunSummary(plan=plan, repaired_bytes=log.repaired_bytes)
    if cfg.retry_failed:
        done = {r.key for r in existing if r.status != "failed"}
        superseded = {r.key for r in existing if r.status == "failed" and r.key in done}
        stale = plan.retrying | superseded  # retried now, or already answered by a later ok/refused line
        summary.removed_failed = log.rewrite_without(stale)
    if not plan.todo:
        return summary
    own_client = client is None
    client = client or make_client(cfg, api_key)
    work = iter(plan.todo)
    start = time.perf_counter()
    bar = tqdm(total=len(plan.todo), unit="req", desc=f"distill {cfg.model}", file=sys.stderr, disable=not progress,
               dynamic_ncols=True, mininterval=0.5)

    async def one(record: MireRecord, mode: int) -> ReasonRecord:
        t0 = time.perf_counter()
        try:
            if record.images:  # decoding and resizing images is CPU work: keep the event loop free
                request = await asyncio.to_thread(build_request, record, image_dir, mode, cfg)
            else:
                request = build_request(record, image_dir, mode, cfg)
        except Exception as exc:  # noqa: BLE001 - an unreadable image fails its record, not the run
            return ReasonRecord(id=record.id, mode=mode, model=cfg.model, status="failed", gold=record.output,
                                task=record.task, error=f"building the request: {type(exc).__name__}: {exc}")
        try:
            body, _ = await complete_with_retries(client, request, cfg)
            rec = reason_from_response(body, record, mode, cfg.model)
        except TeacherError as exc:
            rec = ReasonRecord(id=record.id, mode=mode, model=cfg.model, status="refused" if exc.refused else "failed",
                               gold=record.output, task=record.task, error=str(exc))
        except Exception as exc:  # noqa: BLE001 - whatever a reply holds fails its record, never the run
            rec = ReasonRecord(id=record.id, mode=mode, model=cfg.model, status="failed", gold=record.output,
                               task=record.task, error=f"unreadable response ({type(exc).__name__}: {_short(exc, 160)})")
        rec.latency_s = round(time.perf_counter() - t0, 4)
        return rec

    async def worker() -> None:
        for record, mode in work:
            rec = scrub_record(await one(record, mode), api_key)
            log.append(rec)
            summary.requests += 1
            summary.statuses[rec.status] += 1
            if rec.error:
                summary.errors[rec.error.split(":")[0].split(" (")[0]] += 1
            summary.prompt_tokens += rec.usage.get("prompt_tokens", 0)
            summary.completion_tokens += rec.usage.get("completion_tokens", 0)
            bar.set_postfix(ok=summary.statuses["ok"], refused=summary.statuses["refused"],
                            failed=summary.statuses["failed"],
                            tokens=summary.prompt_tokens + summary.completion_tokens, refresh=False)
            bar.update(1)

    try:
        with log:
            await asyncio.gather(*(worker() for _ in range(max(1, min(cfg.concurrency, len(plan.todo))))))
    finally:
        bar.close()
        summary.elapsed_s = time.perf_counter() - start
        if own_client:
            await client.close()
    return summary


def format_summary(summary: RunSummary, output_file: str | os.PathLike) -> str:
    plan = summary.plan
    lines = []
    if summary.repaired_bytes:
        lines.append(f"dropped an unfinished last line ({summary.repaired_bytes} bytes) left by an interrupted run")
    if summary.removed_failed:
        lines.append(f"removed {summary.removed_failed} failed lines to retry them")
    rate = summary.requests / summary.elapsed_s if summary.elapsed_s > 0 else 0.0
    st = summary.statuses
    lines.append(
        f"{summary.requests} requests in {summary.elapsed_s:.1f}s ({rate:.1f} req/s): ok {st['ok']}, refused "
        f"{st['refused']}, failed {st['failed']}; tokens {summary.prompt_tokens} prompt + "
        f"{summary.completion_tokens} completion -> {output_file}"
    )
    if plan is not None and (plan.skipped_done or plan.skipped_failed):
        extra = f", {plan.skipped_failed} failed before (rerun with --retry_failed)" if plan.skipped_failed else ""
        lines.append(f"skipped {plan.skipped_done} already done{extra}")
    for error, n in summary.errors.most_common(8):
        lines.append(f"  {n} x {error}")
    return "\n".join(lines)


def failure_summary(summary: RunSummary) -> str:
    """For stderr when the file still holds failed lines for this run's keys (exit 3); "" when none."""
    plan = summary.plan
    now, before = summary.statuses["failed"], plan.skipped_failed if plan is not None else 0
    if not now and not before:
        return ""
    parts = []
    if now:
        parts.append(f"{now} of {summary.requests} requests of this run failed")
    if before:
        parts.append(f"{before} failed in an earlier run and were not asked again")
    lines = [f"distill finished with failures: {'; '.join(parts)}. Each failed line says why; rerun with "
             "--retry_failed to ask them again."]
    lines += [f"  {n} x {error}" for error, n in summary.errors.most_common(5) if error]
    return "\n".join(lines)
