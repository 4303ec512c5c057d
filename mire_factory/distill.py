"""Teacher distillation: requests to an OpenAI-compatible server, retries, and a resumable reasons file.

The output file is an append-only log of ReasonRecord lines, one per (record id, mode, model). Each line is written
with a single write() and fsync'd, so a kill loses at most the requests in flight and never a finished answer that
was paid for. A rerun skips every key already present with status ok or refused; failed keys are skipped too unless
`retry_failed`, in which case their old lines are removed (atomic rewrite) before they are asked again, so the file
never holds a key twice.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from .append_log import AppendLog
from .content import to_content_parts
from .io import MireInputError, output_lock, problem
from .prompts import teacher_prompt
from .reasons import ReasonRecord, reason_from_dict
from .records import MireRecord
from .teacher import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    PLACEHOLDER_KEY,
    Plan,
    RunSummary,
    TeacherConfig,
    TeacherError,
    complete_with_retries,
    image_data_url,
    make_client,
    run_jobs,
    scrub_record,
    short,
)
from .teacher_reply import parse_reply, read_completion, refusal_reason

LINE_START = b'{"id": '  # how every line of a reasons file begins (ReasonRecord.to_json)


@dataclass
class DistillConfig(TeacherConfig):
    modes: list[int] = field(default_factory=lambda: [1])
    max_chars: int = 100


# ---------------------------------------------------------------- requests


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


def check_modes(records: list[MireRecord], modes: Iterable[int], file: str | os.PathLike) -> None:
    """Modes 2 and 3 give the teacher the gold label: every record needs one."""
    if any(m not in (1, 2, 3) for m in modes):
        raise MireInputError(f"--mode: expected 1, 2 or 3, got {list(modes)}")
    if any(m in (2, 3) for m in modes):
        missing = [problem(file, r.id, "output", "modes 2 and 3 need the gold label") for r in records if not r.has_label]
        if missing:
            raise MireInputError(missing)


# ---------------------------------------------------------------- the reasons file


class ReasonsLog(AppendLog[ReasonRecord]):
    """The append-only reasons file: one ReasonRecord line per (record id, mode, model)."""

    line_start = LINE_START
    kind = "a reasons file of tools.distill"
    hint = "distill appends only to a reasons file or a new or empty one: choose another --output_file"

    def parse(self, row: dict, lineno: int) -> ReasonRecord:
        return reason_from_dict(row, self.path, lineno)

    def rewrite_without(self, drop: set[tuple[str, int, str]], kinds: tuple[str, ...] = ("failed",)) -> int:
        """Atomically removes the lines of `drop` keys whose status is in `kinds`; returns how many went."""
        if not drop:
            return 0
        return super().rewrite_without(lambda row: (row["id"], row["mode"], row["model"]) in drop
                                       and row["status"] in kinds)

    def append(self, rec: ReasonRecord) -> None:
        self.append_line(rec.to_json())


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


def reason_from_response(body: dict, record: MireRecord, mode: int, model: str) -> ReasonRecord:
    rec = ReasonRecord(id=record.id, mode=mode, model=model, status="ok", gold=record.output, task=record.task)
    try:
        reply = read_completion(body)
    except ValueError as exc:
        rec.status, rec.error = "failed", f"malformed response ({short(exc, 120)})"
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


async def run_distill(records: list[MireRecord], image_dir: str | os.PathLike, cfg: DistillConfig,
                      output_file: str | os.PathLike, api_key: str = PLACEHOLDER_KEY, progress: bool = True,
                      client=None) -> RunSummary:
    log = ReasonsLog(output_file)
    log.load(repair=False)  # refuses a file that is not ours before even a lock file is created beside it
    with output_lock(output_file, what="another tools.distill is writing it"):
        return await _run_locked(log, records, image_dir, cfg, api_key, progress, client)


async def _run_locked(log: ReasonsLog, records: list[MireRecord], image_dir: str | os.PathLike, cfg: DistillConfig,
                      api_key: str, progress: bool, client) -> RunSummary:
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

    async def one(job: tuple[MireRecord, int]) -> ReasonRecord:
        record, mode = job
        t0 = time.perf_counter()
        try:
            if record.images:  # decoding and resizing images is CPU work: keep the event loop free
                request = await asyncio.to_thread(build_request, record, image_dir, mode, cfg)
            else:
                request = build_request(record, image_dir, mode, cfg)
        except Exception as exc:  # noqa: BLE001 - an unreadable image fails its record, not the run
            request, rec = None, ReasonRecord(
                id=record.id, mode=mode, model=cfg.model, status="failed", gold=record.output, task=record.task,
                error=f"building the request: {type(exc).__name__}: {exc}")
        try:
            if request is not None:
                body, _ = await complete_with_retries(client, request, cfg)
                rec = reason_from_response(body, record, mode, cfg.model)
        except TeacherError as exc:
            rec = ReasonRecord(id=record.id, mode=mode, model=cfg.model, status="refused" if exc.refused else "failed",
                               gold=record.output, task=record.task, error=str(exc))
        except Exception as exc:  # noqa: BLE001 - whatever a reply holds fails its record, never the run
            rec = ReasonRecord(id=record.id, mode=mode, model=cfg.model, status="failed", gold=record.output,
                               task=record.task, error=f"unreadable response ({type(exc).__name__}: {short(exc, 160)})")
        rec.latency_s = round(time.perf_counter() - t0, 4)
        return scrub_record(rec, api_key)

    try:
        with log:
            await run_jobs(plan.todo, one, log.append, summary, cfg.concurrency, f"distill {cfg.model}", progress)
    finally:
        if own_client:
            await client.close()
    return summary
