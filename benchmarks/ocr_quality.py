"""OCR on MIRE screenshots: how fast (this CPU), and how much its text alone tells about the image scene.

python -m benchmarks.ocr_quality --input_file ../shared/mire_dev/train_dev.json --image_dir ../shared/mire_dev/images \\
    --info_file .gpu_data/info_dev.jsonl [--full_size_dir ../shared/mire_sample/images] [--speed_images 24]
    [--full_size_images 8] [--json_file ocr_quality.json] [--plot_dir DIR]

Make the info file first: python -m tools.extract_info --input_file ... --image_dir ... --output_file INFO.

1. Speed. (a) The info file's run: each image's wall seconds in its worker (one onnxruntime thread each; the info
   file's latency_s, which grows with the machine's load), and the run's wall time per image if given (--run_wall_s,
   from the tool's summary line). (b) A clean timing here: the same engine in this process, one image after
   another, over --speed_images images of --image_dir and the --full_size_images largest screenshots of
   --full_size_dir, with 1 and with 2 onnxruntime threads: wall and CPU seconds per image (CPU time does not grow
   when other work shares the cores; wall time does), and the load average.
2. Quality. Image-scene records only (their instruction is one fixed text for every scene: without the screenshot's
   text a text classifier can only answer one class, the majority figure). TF-IDF of character 1-3-grams and a
   logistic regression (C chosen by an inner 3-fold search on each training fold) on the OCR text of the record's
   image, stratified 5-fold cross-validation: the official weighted F1 (mire_factory.scoring) of the pooled
   out-of-fold predictions, and the mean and spread over folds; against the majority class of each training fold.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mire_factory.image_info import read_info_file  # noqa: E402
from mire_factory.io import write_json_atomic  # noqa: E402
from mire_factory.records import load_records  # noqa: E402
from mire_factory.scoring import per_class_scores, plot_confusion, task_scores  # noqa: E402

C_GRID = (1.0, 10.0, 100.0)


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def time_engine(paths: list[Path], threads: int) -> dict:
    """Wall and CPU seconds per image of RapidOCR in this process, images one after another (after one warm-up)."""
    from PIL import Image, ImageOps
    from rapidocr_onnxruntime import RapidOCR

    from mire_factory.ocr import model_paths

    engine = RapidOCR(**model_paths(), intra_op_num_threads=threads, inter_op_num_threads=1)
    with Image.open(paths[0]) as img:
        engine(ImageOps.exif_transpose(img).convert("RGB"))
    load_before = os.getloadavg()[0]
    walls, cpus, pixels, lines = [], [], [], []
    for path in paths:
        w0, c0 = time.perf_counter(), _cpu_s()
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img).convert("RGB")
        result, _ = engine(img)
        walls.append(time.perf_counter() - w0)
        cpus.append(_cpu_s() - c0)
        pixels.append(img.width * img.height)
        lines.append(len(result or []))
    return {"images": len(paths), "threads": threads, "wall_s_mean": statistics.mean(walls),
            "wall_s_median": statistics.median(walls), "cpu_s_mean": statistics.mean(cpus),
            "pixels_mean": statistics.mean(pixels), "pixels_max": max(pixels), "lines_mean": statistics.mean(lines),
            "load_before": load_before, "load_after": os.getloadavg()[0]}


def run_speed(info_rows: list[dict], image_dir: Path, full_size_dir: Path | None, n_dev: int, n_full: int,
              run_wall_s: float | None) -> dict:
    ok = [r for r in info_rows if r["status"] == "ok" and r.get("latency_s")]
    worker = [r["latency_s"] for r in ok]
    result = {"run": {"images": len(info_rows), "worker_wall_s_mean": statistics.mean(worker),
                      "worker_wall_s_median": statistics.median(worker),
                      "worker_wall_s_p90": sorted(worker)[int(0.9 * (len(worker) - 1))],
                      "pixels_mean": statistics.mean(r["width"] * r["height"] for r in ok),
                      "lines_mean": statistics.mean(len(r["lines"]) for r in ok),
                      "empty_text": sum(1 for r in info_rows if r["status"] == "ok" and not r["text"]),
                      "failed": sum(1 for r in info_rows if r["status"] != "ok")}}
    if run_wall_s:
        result["run"]["wall_s_per_image"] = run_wall_s / len(info_rows)
    dev = sorted({r["image"] for r in ok})[:: max(1, len(ok) // max(n_dev, 1))][:n_dev]
    result["dev_clean"] = {str(t): time_engine([image_dir / name for name in dev], t) for t in (1, 2)}
    if full_size_dir is not None and n_full:
        full = sorted(p for p in full_size_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        with_size = []
        from PIL import Image

        for p in full:
            with Image.open(p) as img:
                with_size.append((img.width * img.height, p))
        screenshots = [p for px, p in sorted(with_size, reverse=True)[:n_full]]  # the largest: phone screenshots
        result["full_size_clean"] = {str(t): time_engine(screenshots, t) for t in (1, 2)}
    return result


def image_texts(input_file: str, image_dir: str, info_file: str) -> tuple[list[str], list[str], int]:
    """(texts, labels, images without text in the info file) of the image-scene records."""
    index = read_info_file(info_file)
    texts, labels, missing = [], [], 0
    for record in load_records(input_file, image_dir):
        if record.task != "image":
            continue
        parts = []
        for name in record.images:
            text = index.text_for(Path(image_dir) / name)
            missing += text is None
            parts.append(text or "")
        texts.append("\n".join(parts))
        labels.append(record.output)
    return texts, labels, missing


def run_quality(texts: list[str], labels: list[str], seed: int) -> dict:
    from sklearn.dummy import DummyClassifier
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline

    outer = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    models = {
        "majority": lambda: DummyClassifier(strategy="most_frequent"),
        "tfidf_ocr": lambda: GridSearchCV(
            make_pipeline(TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True),
                          LogisticRegression(max_iter=5000)),
            {"logisticregression__C": C_GRID}, scoring="f1_weighted",
            cv=StratifiedKFold(n_splits=3, shuffle=True, random_state=seed)),
    }
    result = {}
    for name, make in models.items():
        predicted = [None] * len(texts)
        folds, chosen = [], []
        for train, test in outer.split(texts, labels):
            model = make()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # classes with fewer members than inner folds
                model.fit([texts[i] for i in train], [labels[i] for i in train])
            out = model.predict([texts[i] for i in test])
            for i, p in zip(test, out, strict=True):
                predicted[i] = str(p)
            folds.append(task_scores([labels[i] for i in test], [str(p) for p in out])["f1"])
            if hasattr(model, "best_params_"):
                chosen.append(model.best_params_["logisticregression__C"])
        result[name] = {**task_scores(labels, predicted), "fold_f1_mean": statistics.mean(folds),
                        "fold_f1_std": statistics.stdev(folds), "fold_f1": folds,
                        "per_class": per_class_scores("image", labels, predicted), "predicted": predicted}
        if chosen:
            result[name]["C_chosen"] = chosen
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_file", required=True)
    parser.add_argument("--image_dir", required=True)
    parser.add_argument("--info_file", required=True, help="tools.extract_info's output for these images")
    parser.add_argument("--full_size_dir", help="folder of full-size screenshots to time too")
    parser.add_argument("--speed_images", type=int, default=24)
    parser.add_argument("--full_size_images", type=int, default=8)
    parser.add_argument("--run_wall_s", type=float, help="wall seconds of the tool's run that made --info_file")
    parser.add_argument("--skip_speed", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json_file")
    parser.add_argument("--plot_dir", help="confusion_image.png/.csv of the TF-IDF model's out-of-fold predictions")
    args = parser.parse_args(argv)
    rows = [json.loads(line) for line in Path(args.info_file).read_text(encoding="utf-8").splitlines() if line]
    report = {"cores": len(os.sched_getaffinity(0)), "load_at_start": os.getloadavg()}
    texts, labels, missing = image_texts(args.input_file, args.image_dir, args.info_file)
    report["quality"] = {"records": len(texts), "classes": len(set(labels)), "images_without_info": missing,
                         **run_quality(texts, labels, args.seed)}
    q = report["quality"]
    print(f"image-scene records: {q['records']} in {q['classes']} classes; images without info: {missing}")
    print("model            weighted F1 (pooled)  accuracy  fold F1 mean +- std")
    for name in ("majority", "tfidf_ocr"):
        m = q[name]
        print(f"{name:16s} {m['f1']:.4f}                {m['accuracy']:.4f}    {m['fold_f1_mean']:.4f} +- "
              f"{m['fold_f1_std']:.4f}")
    if args.plot_dir:
        png, _ = plot_confusion("image", labels, q["tfidf_ocr"]["predicted"], args.plot_dir)
        print(f"wrote {png}")
    worst = sorted(q["tfidf_ocr"]["per_class"].items(), key=lambda kv: kv[1]["f1"])[:5]
    print("weakest classes (F1): " + ", ".join(f"{label} {m['f1']:.2f}" for label, m in worst))
    if not args.skip_speed:
        speed = run_speed(rows, Path(args.image_dir), Path(args.full_size_dir) if args.full_size_dir else None,
                          args.speed_images, args.full_size_images, args.run_wall_s)
        report["speed"] = speed
        run = speed["run"]
        print(f"\nthe info file's run: {run['images']} images, wall time per image in its worker (1 thread) mean "
              f"{run['worker_wall_s_mean']:.2f} s, median {run['worker_wall_s_median']:.2f} s, p90 "
              f"{run['worker_wall_s_p90']:.2f} s; {run['pixels_mean']:.0f} px and {run['lines_mean']:.1f} lines on average; {run['empty_text']} "
              f"without text; {run['failed']} failed" + (f"; wall {run['wall_s_per_image']:.2f} s per image"
                                                          if "wall_s_per_image" in run else ""))
        for key in ("dev_clean", "full_size_clean"):
            for threads, t in speed.get(key, {}).items():
                print(f"{key} ({t['images']} images, {t['pixels_mean']:.0f} px mean, {threads} thread(s)): wall "
                      f"{t['wall_s_mean']:.2f} s (median {t['wall_s_median']:.2f}), CPU {t['cpu_s_mean']:.2f} s per "
                      f"image; load {t['load_before']:.1f} -> {t['load_after']:.1f}")
    if args.json_file:
        write_json_atomic(args.json_file, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
