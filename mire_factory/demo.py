"""The whole pipeline on an embedded default: synthetic MIRE data, a tiny real-tokenizer Qwen2-VL, CPU only.

Every step is the product's own: tools.validate, tools.convert, `python -m mire_factory.train` (LLaMA-Factory's
run_exp, as `llamafactory-cli train` runs it, with the per-task F1 callback) on the full-SFT recipe (overrides only
for model size, steps and devices, and the launcher's exact label-positions-only logits), tools.vllm_infer (hf
backend), tools.convert2submit and tools.cal_acc. The untrained model is scored first, so the gain from training shows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .convert import convert
from .evaluate import evaluate, write_evaluation, write_submission
from .infer.args import resolve_infer_args
from .infer.pipeline import run as run_inference
from .io import write_json_atomic
from .records import read_mire_file, summarize
from .synthetic import make_records
from .tiny_model import make_tiny_model

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "qwen2_vl_full_sft.yaml"

# Six classes per task, each with a strong colour / phrase signal: what a 2-layer, 128-wide model learns in ~290
# CPU steps. The label strings, instructions and formats are the real ones. 212 records a task: with 106 the
# dialogues were learned by some seeds only (fp32, 2026-12-03: overall F1 0.95, 1.00, 0.80, 0.98 for seeds 0-3;
# with 212, 1.00 for seeds 0-5); benchmarks/demo_seeds_2026-12-03/.
DEMO_IMAGE_CLASSES = ("实物拍摄(含售后)", "商品头图", "订单详情页面", "支付页面", "退款页面", "物流页面-物流跟踪页面")
DEMO_DIALOGUE_CLASSES = ("反馈密封性不好", "是否好用", "商品材质", "单品推荐", "何时上货", "气泡")
DATA_STYLE = dict(image_classes=DEMO_IMAGE_CLASSES, dialogue_classes=DEMO_DIALOGUE_CLASSES, image_size=(168, 168),
                  max_dialogue_images=2, phrase_turns=3)


@dataclass
class DemoConfig:
    workdir: Path
    seed: int = 0
    train_per_task: int = 212
    test_per_task: int = 30
    epochs: float = 3.0
    learning_rate: float = 5e-3  # a random-weight tiny model needs a far larger step than fine-tuning a 7B one
    batch_size: int = 4
    max_new_tokens: int = 16


# glibc's transparent huge pages for malloc (glibc >= 2.35; ignored elsewhere; the kernel must offer THP). They
# mattered when every step allocated gigabytes of full-vocabulary logits (40 bf16 steps: 76 s -> 47 s); with the
# logits at label positions only, 40 fp32 steps trained in 52.8 s without and 54.6 s with them (2026-12-03, 2-core
# AVX2 CPU, benchmarks/bench_demo_train.py --what train --envs default,demo), with 18x fewer page faults. Kept: it
# costs nothing where the kernel offers THP.
CPU_TRAIN_ENV = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}

_START = time.perf_counter()


def _step(n: int, total: int, text: str) -> None:
    print(f"\n[{n}/{total}] (t={time.perf_counter() - _START:.0f}s) {text}", flush=True)


def train_overrides(cfg: DemoConfig, model_dir: Path, data_dir: Path, out_dir: Path) -> list[str]:
    """The recipe stays as shipped except for model size, steps and devices (CPU: no DeepSpeed, fp32) and the
    launcher's mire_label_logits_only: the 151,936-token output layer at the ~5 answer positions of a record
    instead of all ~300 (the same loss; 20 fp32 steps on a 2-core AVX2 CPU: 106.6 s with full logits, 29.8 s).
    fp32, not the recipe's bf16: the demo's outcome must not depend on the CPU (bf16 on the CPU ran natively only
    with AVX512-BF16 or AMX, elsewhere PyTorch's scalar reference GEMM: over 20 minutes of training), and a tiny
    random-weight model lands differently with each arithmetic."""
    return [
        f"model_name_or_path={model_dir}",
        f"dataset_dir={data_dir}",
        f"output_dir={out_dir}",
        "deepspeed=null",
        "use_cpu=true",
        "bf16=false",
        f"per_device_train_batch_size={cfg.batch_size}",
        "gradient_accumulation_steps=1",
        f"num_train_epochs={cfg.epochs}",
        f"learning_rate={cfg.learning_rate}",
        "preprocessing_num_workers=2",
        "dataloader_num_workers=2",  # collate (image processing) while the step computes
        "eval_steps=1000",
        "save_steps=1000",
        "logging_steps=12",
        f"seed={cfg.seed}",
        "mire_label_logits_only=true",
    ]


def train_command(cfg: DemoConfig, model_dir: Path, data_dir: Path, out_dir: Path) -> list[str]:
    return [sys.executable, "-m", "mire_factory.train", str(RECIPE),
            *train_overrides(cfg, model_dir, data_dir, out_dir)]


def cpu_train_env() -> dict[str, str]:
    return {"DISABLE_VERSION_CHECK": "1", "TOKENIZERS_PARALLELISM": "false", **CPU_TRAIN_ENV}


class ExampleDumpFilter:
    """Drops the data example LLaMA-Factory prints before training (its data/loader.py, on the main process, with
    no switch to turn it off): "training example:" or "eval example:", then input_ids, inputs, label_ids and
    labels, each a header line followed by its value; hundreds of token ids nobody reads in a demo."""

    HEADERS = ("training example:", "eval example:")

    def __init__(self):
        self.state = "pass"

    def keep(self, line: str) -> bool:
        text = line.rstrip("\n")
        if self.state == "pass":
            if text.strip() in self.HEADERS:
                self.state = "example"
                return False
            return True
        if self.state == "example":  # input_ids, inputs (multi-line text), label_ids: up to the labels header
            if text == "labels:":
                self.state = "labels"
            return False
        if self.state == "labels":  # the decoded answer, "<label><|im_end|>", then the blank line print adds
            self.state = "blank" if text.endswith("<|im_end|>") else "pass"
            return False
        self.state = "pass"
        return bool(text) and self.keep(line)


def run_filtered(cmd: list[str], env: dict, log: Path) -> int:
    """Runs cmd with its stdout copied whole to `log` and shown without the data examples; stderr (progress bars,
    warnings) as it comes."""
    keep = ExampleDumpFilter()
    with open(log, "w", encoding="utf-8") as raw, subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True, encoding="utf-8", errors="replace", bufsize=1
    ) as proc:
        for line in proc.stdout:
            raw.write(line)
            if keep.keep(line):
                sys.stdout.write(line)
                sys.stdout.flush()
    return proc.returncode


def build_data(cfg: DemoConfig) -> dict[str, Path]:
    data = cfg.workdir / "data"
    images = data / "images"
    train = make_records(cfg.train_per_task, cfg.train_per_task, images, seed=cfg.seed, **DATA_STYLE)
    gold = make_records(cfg.test_per_task, cfg.test_per_task, images, seed=cfg.seed + 1000, id_prefix="test",
                        **DATA_STYLE)
    unlabelled = [{k: v for k, v in r.items() if k != "output"} for r in gold]
    paths = {"train": data / "train.json", "test": data / "test.json", "gold": data / "test_gold.json",
             "images": images}
    write_json_atomic(paths["train"], train)
    write_json_atomic(paths["test"], unlabelled)
    write_json_atomic(paths["gold"], gold)
    return paths


def infer_and_score(model_dir: Path, data_dir: Path, gold: Path, test: Path, out: Path, cfg: DemoConfig,
                    plots: bool) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    preds = out / "predictions.jsonl"
    run_inference(resolve_infer_args(model_name_or_path=str(model_dir), dataset="mire_test",
                                     dataset_dir=str(data_dir), backend="hf", save_name=str(preds),
                                     max_new_tokens=cfg.max_new_tokens, batch_size=16,
                                     overwrite=True))  # a fresh run, not a resume of an older one
    print("\n".join(write_submission(test, preds, out / "submit.csv")))
    evaluation = evaluate(gold, preds)
    print(evaluation.text())
    write_evaluation(evaluation, out / "metrics.json", out if plots else None)
    return json.loads((out / "metrics.json").read_text(encoding="utf-8"))


def run_demo(cfg: DemoConfig) -> dict:
    """Runs the seven steps; returns the summary (untrained and trained scores, elapsed seconds)."""
    # the libraries' INFO logs would bury the demo's own story; progress bars and warnings stay
    quiet = {"LLAMAFACTORY_VERBOSITY": "WARN", "TRANSFORMERS_VERBOSITY": "warning"}
    saved = {key: os.environ.get(key) for key in quiet}
    os.environ.update({k: v for k, v in quiet.items() if saved[k] is None})
    try:
        return _run_demo(cfg)
    finally:  # leave the caller's environment as it was (tests run other tools after the demo)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)


def _run_demo(cfg: DemoConfig) -> dict:
    global _START
    start = _START = time.perf_counter()
    work = cfg.workdir.resolve()
    cfg.workdir = work
    total = 7
    _step(1, total, "building the tiny Qwen2-VL: real Qwen2 tokenizer, random weights (make_tiny_model --preset demo)")
    model_dir = make_tiny_model(work / "model", preset="demo", seed=cfg.seed)

    _step(2, total, f"generating synthetic MIRE data: {2 * cfg.train_per_task} train, {2 * cfg.test_per_task} test "
          f"records, {len(DEMO_IMAGE_CLASSES)} image scenes + {len(DEMO_DIALOGUE_CLASSES)} intents")
    paths = build_data(cfg)

    _step(3, total, "validating and converting (tools.validate, tools.convert)")
    mire = work / "mire"
    for name in ("train", "test"):
        checked = read_mire_file(paths[name], paths["images"])
        print(f"ok: {paths[name]}: {checked.kind} file, {summarize(checked.records)}")
    print(convert(paths["train"], paths["images"], mire, val_size=0.1, seed=cfg.seed).summary)
    print(convert(paths["test"], paths["images"], mire).summary)

    _step(4, total, "scoring the untrained model (tools.vllm_infer --backend hf, tools.cal_acc)")
    before = infer_and_score(model_dir, mire, paths["gold"], paths["test"], work / "untrained", cfg, plots=False)

    _step(5, total, f"training: python -m mire_factory.train {RECIPE.relative_to(REPO)} (LLaMA-Factory, full SFT; "
          "CPU overrides)")
    saves = work / "saves"
    cmd = train_command(cfg, model_dir, mire, saves)
    log = work / "train_stdout.log"
    print("  $ " + " ".join(cmd), flush=True)
    print(f"  (LLaMA-Factory's whole standard output, example token ids included: {log})", flush=True)
    code = run_filtered(cmd, {**os.environ, **cpu_train_env()}, log)
    if code != 0:
        raise SystemExit(f"mire_factory.train failed with exit code {code}; see {log}")

    _step(6, total, "inference with the trained model, submission CSV, official metric")
    after = infer_and_score(saves, mire, paths["gold"], paths["test"], work / "trained", cfg, plots=True)

    _step(7, total, "summary")
    elapsed = time.perf_counter() - start
    summary = {"untrained": before["overall"], "trained": after["overall"], "image": after["image"],
               "dialogue": after["dialogue"], "elapsed_s": round(elapsed, 1), "workdir": str(work)}
    write_json_atomic(work / "metrics.json", after)
    write_json_atomic(work / "summary.json", summary)
    print(format_table(before, after))
    print(f"\nartifacts in {work}: trained/submit.csv, metrics.json, trained/confusion_*.png, "
          f"saves/training_loss.png; {elapsed:.0f} s in all")
    return summary


def format_table(before: dict, after: dict) -> str:
    rows = [("untrained, overall", before["overall"]), ("trained, image", after["image"]),
            ("trained, dialogue", after["dialogue"]), ("trained, overall", after["overall"])]
    lines = [f"{'':20} {'f1':>7} {'accuracy':>9} {'precision':>10} {'recall':>7}"]
    for name, s in rows:
        lines.append(f"{name:20} {s['f1']:7.4f} {s['accuracy']:9.4f} {s['precision']:10.4f} {s['recall']:7.4f}")
    return "\n".join(lines)
