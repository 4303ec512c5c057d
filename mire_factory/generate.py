"""One teacher request per image: any images with a user (and system) prompt of your own, or the information-extraction
prompt, sent to an OpenAI-compatible vision model; the replies kept in an info file (mire_factory.image_info), then
exported as training data: ShareGPT registered in dataset_info.json for LLaMA-Factory, or ms-swift JSONL.

Client, retries, concurrency, resume and key scrubbing are tools.distill's (mire_factory.teacher, append_log); what
is here is the request of one image and the reading of its reply.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from .convert import chat_row, image_path_maker
from .dataset_info import PROMPT_VARIANT_KEY, commit_registrations, sharegpt_entry
from .image_info import ImageItem, InfoLog, InfoRecord, copy_for, plan_images
from .io import MireInputError, OutputSet, output_lock, problem
from .prompts import INFO_EXTRACTION_PROMPT, INFO_TEXT_KEY
from .records import IMAGE_PLACEHOLDER
from .teacher import (
    PLACEHOLDER_KEY,
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
from .teacher_reply import parse_json_object, read_completion, refusal_reason

EXPORT_FORMATS = ("sharegpt", "swift")
_TEXT_KEYS = (INFO_TEXT_KEY, "visible_text", "text", "文字")
_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ImagePrompt:
    """What each image is asked. `extract_info`: the reply is the extraction JSON, whose 可见文字 becomes `text`;
    otherwise `text` is the whole reply."""

    user: str
    system: str | None = None
    extract_info: bool = False

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps([self.system, self.user], ensure_ascii=False).encode()).hexdigest()


def read_prompt_file(path: str | os.PathLike, flag: str) -> str:
    path = Path(path)
    if path.is_dir():
        raise MireInputError(problem(path, None, None, f"{flag}: is a directory, expected a text file"))
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise MireInputError(problem(path, None, None, f"{flag}: file not found")) from None
    except UnicodeDecodeError as exc:
        raise MireInputError(problem(path, None, None, f"{flag}: not UTF-8 text (byte {exc.start})")) from None
    if not text.strip():
        raise MireInputError(problem(path, None, None, f"{flag}: the prompt is empty"))
    return text.strip("\n")


def make_prompt(prompt_file: str | None, system_prompt_file: str | None, extract_info: bool) -> ImagePrompt:
    """The prompt of a run: the files', else (extract_info only) the built-in information-extraction prompt."""
    user = read_prompt_file(prompt_file, "--prompt_file") if prompt_file else INFO_EXTRACTION_PROMPT if extract_info \
        else None
    if user is None:
        raise MireInputError("--prompt_file: required (the text asked of every image)")
    system = read_prompt_file(system_prompt_file, "--system_prompt_file") if system_prompt_file else None
    return ImagePrompt(user, system, extract_info and prompt_file is None)


def build_image_request(item: ImageItem, prompt: ImagePrompt, cfg: TeacherConfig) -> dict:
    """The system prompt (if any), then one user turn: the image, then the prompt (Qwen2-VL's own order)."""
    url = image_data_url(item.path, max_pixels=cfg.max_pixels, min_pixels=cfg.min_pixels)
    messages = [{"role": "system", "content": prompt.system}] if prompt.system else []
    messages.append({"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": prompt.user}]})
    return {"model": cfg.model, "messages": messages, "max_tokens": cfg.max_tokens, "temperature": cfg.temperature}


def _visible_text(obj: dict) -> str | None:
    lowered = {str(k).strip().lower(): v for k, v in obj.items()}
    for key in _TEXT_KEYS:
        value = lowered.get(key.lower())
        if isinstance(value, list):
            return "\n".join(str(x).strip() for x in value if str(x).strip())
        if isinstance(value, str):
            return value.strip()
    return None


def info_from_response(body: dict, item: ImageItem, prompt: ImagePrompt, model: str) -> InfoRecord:
    rec = InfoRecord(item.name, item.sha256, "teacher", model, "ok", prompt_sha256=prompt.sha256)
    try:
        reply = read_completion(body)
    except ValueError as exc:
        rec.status, rec.error = "failed", f"malformed response ({short(exc, 120)})"
        return rec
    rec.raw, rec.usage = reply.text, reply.usage
    refused = refusal_reason(reply.text, reply.finish_reason, reply.refusal)
    if refused and not (prompt.extract_info and parse_json_object(reply.text)):
        rec.status, rec.error = "refused", refused
        return rec
    cut = "; the reply was cut at max_tokens (raise --max_tokens)" if reply.finish_reason == "length" else ""
    if prompt.extract_info:
        rec.info = parse_json_object(reply.text)
        rec.text = _visible_text(rec.info) if rec.info is not None else None
        if rec.text is None:
            rec.status = "failed"
            rec.error = ("unparseable reply: no JSON object" if rec.info is None
                         else f"reply has no '{INFO_TEXT_KEY}' field") + cut
    else:
        rec.text = (reply.text or "").strip()
        if not rec.text or cut:  # a cut reply is not a training target
            rec.status, rec.error = "failed", ("empty reply" if not rec.text else cut.removeprefix("; "))
    return rec


async def run_teacher(items: list[ImageItem], output_file: str | os.PathLike, cfg: TeacherConfig, prompt: ImagePrompt,
                      api_key: str = PLACEHOLDER_KEY, progress: bool = True, client=None,
                      tool: str = "tools.generate") -> RunSummary:
    """Asks the teacher about every image not done yet; one info line per image name, appended as each returns."""
    origin = ("teacher", cfg.model, prompt.sha256)
    log = InfoLog(output_file)
    log.check_origin(log.load(repair=False), origin)  # before a lock file appears beside it
    with output_lock(output_file, what=f"another {tool} is writing it"):
        existing = log.load()
        plan = plan_images(items, existing, cfg.retry_failed)
        summary = RunSummary(plan=plan, repaired_bytes=log.repaired_bytes)
        if plan.retrying:
            summary.removed_failed = log.rewrite_without(lambda row: row["sha256"] in plan.retrying
                                                         and row["status"] == "failed")
        with log:
            for item, done in plan.copies:
                log.append(copy_for(item, done))
            if plan.todo:
                await _ask(plan.todo, log, summary, cfg, prompt, api_key, progress, client)
    return summary


async def _ask(groups: list[list[ImageItem]], log: InfoLog, summary: RunSummary, cfg: TeacherConfig,
               prompt: ImagePrompt, api_key: str, progress: bool, client) -> None:
    own_client = client is None
    client = client or make_client(cfg, api_key)

    async def one(group: list[ImageItem]) -> list[InfoRecord]:
        item, t0 = group[0], time.perf_counter()
        try:
            request = await asyncio.to_thread(build_image_request, item, prompt, cfg)  # decoding is CPU work
        except Exception as exc:  # noqa: BLE001 - an unreadable image fails its row, not the run
            request = None
            rec = InfoRecord(item.name, item.sha256, "teacher", cfg.model, "failed", prompt_sha256=prompt.sha256,
                             error=f"building the request: {type(exc).__name__}: {short(exc, 200)}")
        try:
            if request is not None:
                body, _ = await complete_with_retries(client, request, cfg)
                rec = info_from_response(body, item, prompt, cfg.model)
        except TeacherError as exc:
            rec = InfoRecord(item.name, item.sha256, "teacher", cfg.model, "refused" if exc.refused else "failed",
                             prompt_sha256=prompt.sha256, error=str(exc))
        except Exception as exc:  # noqa: BLE001 - whatever a reply holds fails its row, never the run
            rec = InfoRecord(item.name, item.sha256, "teacher", cfg.model, "failed", prompt_sha256=prompt.sha256,
                             error=f"unreadable response ({type(exc).__name__}: {short(exc, 160)})")
        rec.latency_s = round(time.perf_counter() - t0, 4)
        rec = scrub_record(rec, api_key)
        return [rec] + [copy_for(other, rec) for other in group[1:]]

    try:
        await run_jobs(groups, one, log.append, summary, cfg.concurrency, f"teacher {cfg.model}", progress)
    finally:
        if own_client:
            await client.close()


# ---------------------------------------------------------------- training data


def check_dataset_name(name: str) -> str:
    if not _DATASET_NAME.match(name or ""):
        raise MireInputError(f"--dataset_name: {name!r} is not a dataset name (letters, digits, _ . -)")
    return name


def export_rows(rows: list[InfoRecord], image_dir: str | os.PathLike, prompt: ImagePrompt, export_dir: str | os.PathLike,
                fmt: str = "sharegpt") -> list[dict]:
    """A chat row per answered image: [system], user "<image>" + prompt, assistant = the reply as received. Image paths
    are relative to export_dir for LLaMA-Factory (its dataset_dir), absolute for ms-swift."""
    path_of = image_path_maker(image_dir, export_dir if fmt == "sharegpt" else None)
    user = IMAGE_PLACEHOLDER + prompt.user
    return [chat_row(user, (r.raw or "").strip(), [r.image], path_of, system=prompt.system, row_id=r.image)
            for r in rows if r.status == "ok"]


def export_dataset(rows: list[InfoRecord], image_dir: str | os.PathLike, prompt: ImagePrompt,
                   export_dir: str | os.PathLike, name: str, fmt: str = "sharegpt") -> tuple[Path, int]:
    """Writes export_dir/NAME.json registered as NAME in dataset_info.json (sharegpt), or export_dir/NAME.jsonl
    (swift); both staged and renamed into place together. Returns (file, rows written)."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {EXPORT_FORMATS}, got {fmt!r}")
    check_dataset_name(name)
    export_dir = Path(export_dir)
    data = export_rows(rows, image_dir, prompt, export_dir, fmt)
    target = export_dir / (f"{name}.json" if fmt == "sharegpt" else f"{name}.jsonl")
    with output_lock(target, what="another export is writing it"), OutputSet() as outs:
        if fmt == "sharegpt":
            outs.write_json(target, data)
            entry = sharegpt_entry(target.name)
            entry.pop(PROMPT_VARIANT_KEY)  # not MIRE records: no prompt variant of ours wrote these turns
            # LLaMA-Factory reads a leading system turn only when the entry names its tag (no default once `tags`
            # is given)
            entry["tags"]["system_tag"] = "system"
            commit_registrations(outs, export_dir, {name: entry})
        else:
            outs.write_jsonl(target, data)
    return target, len(data)
