"""Screenshot text with a real OCR model: RapidOCR (`rapidocr-onnxruntime`: PaddleOCR's PP-OCRv4 Chinese detector and
recogniser and its mobile angle classifier, as ONNX files inside the wheel, Apache-2.0), in a pool of worker
processes, written to a resumable info file (mire_factory.image_info).

The models are loaded from the package's own folder by path: nothing is downloaded, ever. Each worker runs
onnxruntime with `threads` intra-op threads (default 1: on a small machine one image per core beats several cores
per image, because detection and recognition are small kernels), so `workers x threads` should not exceed the cores.

Lines come in RapidOCR's reading order: boxes sorted top to bottom, and left to right within a row (boxes whose tops
are within 10 px of each other count as one row).
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from .image_info import ImageItem, InfoLog, InfoRecord, copy_for, plan_images
from .io import MireInputError, output_lock
from .teacher import RunSummary

OCR_PACKAGE = "rapidocr-onnxruntime"
MODEL_FILES = {  # RapidOCR 1.4's parameter -> the ONNX file shipped in its wheel
    "det_model_path": "ch_PP-OCRv4_det_infer.onnx",
    "rec_model_path": "ch_PP-OCRv4_rec_infer.onnx",
    "cls_model_path": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
}


@dataclass
class OcrConfig:
    workers: int = field(default=0, metadata={"help": "OCR worker processes (0: available cores / threads)"})
    threads: int = field(default=1, metadata={"help": "onnxruntime threads per worker"})
    min_score: float = field(default=0.5, metadata={"help": "lines recognised with less confidence are dropped "
                                                            "(RapidOCR's text_score)"})

    def check(self) -> list[str]:
        out = ["--workers must be >= 0"] if self.workers < 0 else []
        out += ["--threads must be at least 1"] if self.threads < 1 else []
        out += ["--min_score must be in [0, 1]"] if not 0 <= self.min_score <= 1 else []
        return out


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@lru_cache(maxsize=1)
def model_paths() -> dict[str, str]:
    """The ONNX files inside the installed package; a package that is missing or does not load (OpenCV without
    libGL on a minimal image) and a missing model file are one line each (exit 2)."""
    try:
        import rapidocr_onnxruntime
    except ModuleNotFoundError:
        raise MireInputError(f"--backend ocr needs the Python package {OCR_PACKAGE} (pip install -e . installs it "
                             "on Python < 3.13)") from None
    except (ImportError, OSError) as exc:
        raise MireInputError(f"--backend ocr: {OCR_PACKAGE} does not load ({exc}); OpenCV needs libGL and glib: "
                             "apt-get install libgl1 libglib2.0-0") from None
    folder = Path(rapidocr_onnxruntime.__file__).parent / "models"
    paths = {key: folder / name for key, name in MODEL_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise MireInputError(f"{OCR_PACKAGE}: model files missing from the installed package: {', '.join(missing)}")
    return {key: str(p) for key, p in paths.items()}


@lru_cache(maxsize=1)
def engine_name() -> str:
    """The info file's `model`: the package version and its three models (part of the file's origin)."""
    model_paths()
    return f"{OCR_PACKAGE}=={metadata.version(OCR_PACKAGE)}"  # the wheel fixes its three model files


# ---------------------------------------------------------------- in each worker process

_ENGINE = None


def _exit_with_parent(parent: int) -> None:
    # A worker blocks on the pool's queue, whose pipe it holds both ends of: when the parent is killed (SIGKILL),
    # nothing would ever wake it. It leaves as soon as its parent is gone, even in the middle of an image.
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(0)


def _init_worker(threads: int, min_score: float, parent: int) -> None:
    global _ENGINE
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the pool
    threading.Thread(target=_exit_with_parent, args=(parent,), name="exit-with-parent", daemon=True).start()
    import cv2

    cv2.setNumThreads(1)
    from rapidocr_onnxruntime import RapidOCR

    _ENGINE = RapidOCR(**model_paths(), intra_op_num_threads=threads, inter_op_num_threads=1, text_score=min_score)


def ocr_image(path: str, sha256: str) -> dict:
    """In a worker: the image's lines, size and compute time, or {"error": why}. Never raises."""
    t0 = time.perf_counter()
    try:
        import io

        from PIL import Image, ImageOps

        data = Path(path).read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            return {"error": "the file changed after it was hashed; rerun to read it again"}
        with Image.open(io.BytesIO(data)) as img:
            img = ImageOps.exif_transpose(img).convert("RGB")  # RapidOCR takes a PIL RGB image as is
        width, height = img.size
        result, _ = _ENGINE(img)
    except Exception as exc:  # noqa: BLE001 - an undecodable image fails its row, never the run
        return {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
    lines = [{"text": text, "box": [[round(float(x)), round(float(y))] for x, y in box], "score": round(float(score), 4)}
             for box, text, score in (result or [])]
    return {"lines": lines, "width": width, "height": height, "latency_s": round(time.perf_counter() - t0, 4)}


# ---------------------------------------------------------------- the run


def _row(item: ImageItem, model: str, out: dict) -> InfoRecord:
    if "error" in out:
        return InfoRecord(item.name, item.sha256, "ocr", model, "failed", error=out["error"])
    return InfoRecord(item.name, item.sha256, "ocr", model, "ok", text="\n".join(x["text"] for x in out["lines"]),
                      lines=out["lines"], width=out["width"], height=out["height"], latency_s=out["latency_s"])


class OcrPoolError(Exception):
    """The worker pool died (a worker killed, e.g. out of memory): the run stops; finished images are kept."""


def run_ocr(items: list[ImageItem], output_file: str | os.PathLike, cfg: OcrConfig, retry_failed: bool = False,
            progress: bool = True) -> RunSummary:
    """OCR of every item not done yet, appended to `output_file` one line per image as each finishes."""
    from tqdm import tqdm

    model = engine_name()
    log = InfoLog(output_file)
    log.check_origin(log.load(repair=False), ("ocr", model, None))  # before a lock file appears beside it
    with output_lock(output_file, what="another tools.extract_info is writing it"):
        existing = log.load()
        plan = plan_images(items, existing, retry_failed)
        summary = RunSummary(plan=plan, repaired_bytes=log.repaired_bytes)
        if plan.retrying:
            summary.removed_failed = log.rewrite_without(lambda row: row["sha256"] in plan.retrying
                                                         and row["status"] == "failed")
        with log:
            for item, done in plan.copies:
                log.append(copy_for(item, done))
            if not plan.todo:
                return summary
            workers = min(cfg.workers or max(1, available_cores() // cfg.threads), len(plan.todo))
            bar = tqdm(total=sum(len(g) for g in plan.todo), unit="img", desc=f"OCR ({workers} workers)",
                       file=sys.stderr, disable=not progress, dynamic_ncols=True, mininterval=0.5)
            start = time.perf_counter()
            import multiprocessing

            # spawn: workers start clean (no copy of a parent's threads or locks), and import only what OCR needs
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_init_worker, initargs=(cfg.threads, cfg.min_score, os.getpid()))
            try:
                _drain(pool, plan.todo, workers, model, log, summary, bar)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
                bar.close()
                summary.elapsed_s = time.perf_counter() - start
    return summary


def _drain(pool: ProcessPoolExecutor, groups: list[list[ImageItem]], workers: int, model: str, log: InfoLog,
           summary: RunSummary, bar) -> None:
    """Keeps 2 images per worker in flight (so a kill loses at most those) and writes each as it finishes."""
    pending: dict[Future, list[ImageItem]] = {}
    queue = iter(groups)
    while True:
        while len(pending) < 2 * workers:
            group = next(queue, None)
            if group is None:
                break
            pending[pool.submit(ocr_image, str(group[0].path), group[0].sha256)] = group
        if not pending:
            return
        finished, _ = wait(pending, return_when=FIRST_COMPLETED)
        for future in finished:
            group = pending.pop(future)
            try:
                out = future.result()
            except BrokenProcessPool as exc:  # every image in flight is lost with it: none is written
                raise OcrPoolError(f"an OCR worker died ({exc}); out of memory? Try --workers 1") from None
            for item in group:
                row = _row(item, model, out)
                log.append(row)
                summary.count(row)
                bar.update(1)
            bar.set_postfix(ok=summary.statuses["ok"], failed=summary.statuses["failed"], refresh=False)
