"""The quality harness: does the shipped recipe make a real pretrained model better on real MIRE records?

    python benchmarks/quality/run.py --train_file T.json --test_file S.json --image_dir IMAGES --seeds 0 1 \
        --out NAME (--model_dir M | --gguf G.gguf) [--workdir W] [--info_file OCR.jsonl] [--smoke]
    [--variant NAME="TOOLS.CONVERT ARGS" ...] [--variant_epochs NAME=EPOCHS ...] [--variant_reasons NAME=R.jsonl ...]

Every stage goes through the project's own tools, as a user would run them:
  model      tools.make_tiny_model --preset real-0.5b --gguf G (real Qwen2.5-Coder-0.5B-Instruct language model,
             small random vision tower), unless --model_dir holds one
  data       tools.convert: the train file, the test file without its labels (mire_test, for inference) and with
             them (the F1 callback's evaluation set)
  anchor     benchmarks/quality/tfidf_anchor.py: TF-IDF character n-grams + a linear classifier, per seed
  untrained  tools.vllm_infer --backend hf, then tools.cal_acc (greedy: one run serves every seed)
  tokenize   per data variant, before any run: python -m mire_factory.train ... mire_tokenize_only=true with the
             runs' overrides saves the train and evaluation datasets as LLaMA-Factory tokenizes them
             (DATA/tokenized); every run of that data loads them (tokenized_path): one tokenization, not one
             per run
  train      python -m mire_factory.train configs/qwen2_vl_2b_full_sft.yaml (LLaMA-Factory's run_exp plus the
             per-task F1 callback) with the overrides of `train_overrides`, per seed
  infer      tools.vllm_infer --backend hf and tools.cal_acc on the fine-tuned model, per seed
  ocr        the same train and infer on `tools.convert --prompt_variant` data with screenshot text, when tools.convert
             offers the variant and --info_file is given; else recorded as not run
  variants   per --variant NAME="ARGS": the same train and infer on data converted with those tools.convert
             arguments (train, test and evaluation split; train-only flags such as --augment on the train file only);
             with --variant_reasons NAME=R, its train file also gets the reasons of R as a second exchange
             (tools.merge_cot --layout second_turn) while its test files stay plain
  report     benchmarks/quality/results/NAME.json (per-task weighted F1, mean and per seed, under `untrained`,
             `fine_tuned`, `fine_tuned_ocr`, `tfidf_anchor`, and `variants` with each one's difference against
             `fine_tuned`; `eval_f1_curves` and `loss_curves` per run), NAME_eval_f1.png (the callback's eval_f1
             curves and each run's training loss)
  --replot   python benchmarks/quality/run.py --replot results/NAME.json --runs_dir results/NAME/runs: no run;
             adds `loss_curves` from the runs' trainer states to a finished result and redraws its png

Resumable: a stage whose outputs exist is skipped (a rerun after a kill redoes only what is missing); one harness
at a time per work folder. Each stage prints its wall time; the subprocesses' output goes to W/logs/.

The F1 callback evaluates on the test split, for the curve and as a check that training's prompts are inference's
(its last eval_f1 should equal tools.vllm_infer + tools.cal_acc on the same model); no checkpoint is chosen by it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mire_factory.io import (  # noqa: E402
    MireInputError,
    OutputSet,
    atomic_path,
    problem,
    read_json,
    run_cli,
    write_json_atomic,
)
from mire_factory.plots import plot_eval_f1_curves  # noqa: E402
from mire_factory.rules import MAX_NEW_TOKENS  # noqa: E402

RECIPE = REPO / "configs" / "qwen2_vl_2b_full_sft.yaml"
RESULTS = REPO / "benchmarks" / "quality" / "results"
EVAL_DATASET = "mire_quality_eval"
CUTOFF_LEN = 10240  # the recipes' (tools.vllm_infer's default is 4096); the split's longest record has 2,789 tokens
TASKS = ("image", "dialogue", "overall")
# The screenshot-text variant (the extraction issue's): the arguments tools.convert takes for it. {info_file} is
# replaced by --info_file (an info file of tools.extract_info; images are found by their bytes).
OCR_CONVERT_ARGS = "--prompt_variant screenshot_text --info_file {info_file}"
# tools.convert flags that act on a train file's train split only: a variant's test and evaluation conversions leave
# them out (tools.convert refuses --augment on a test file, and the labelled test split must not get copies).
# --corrections_file too: its ids are train records (tools.convert refuses ids a file lacks), and the test split's gold
# labels stay as given.
TRAIN_ONLY_CONVERT_FLAGS = ("--augment", "--augment_mask_ratio", "--corrections_file")
# tools.convert flags the harness sets for each conversion itself
HARNESS_CONVERT_FLAGS = ("--input_file", "--image_dir", "--output_dir", "--val_size", "--kind")
# run and data folders, stage and report names the harness uses itself
RESERVED_VARIANTS = ("label", "ocr", "untrained", "fine_tuned", "model", "anchor", "smoke", "logs")
VARIANT_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")


@dataclass
class Recipe:
    """The 2B recipe's settings that a 0.5B run changes; everything else is configs/qwen2_vl_2b_full_sft.yaml's."""

    # 1e-5 is the 2B/7B recipes' rate; a 0.5B model (hidden 896 against 1536) takes a larger step, and the train
    # split is small (479 records: 60 optimizer steps an epoch), so the run must move further per step.
    learning_rate: float = 2e-5
    # 3 epochs in the recipes (thousands of records); 142 training dialogues over 23 intents need more passes, and
    # an epoch costs seconds on an H200.
    epochs: float = 5.0
    # the recipe's 8 samples per optimizer step, as one micro-batch: a 0.5B model's step is launch-bound, and 8
    # records of at most 2,789 tokens fit a 141 GB GPU many times over
    batch_size: int = 8
    grad_accum: int = 1
    # no gradient checkpointing (the recipe keeps it for 2B's 11-image dialogues on 80 GB): 0.5B activations fit
    gradient_checkpointing: bool = False
    eval_batch_size: int = 16  # the F1 callback generates per_device_eval_batch_size prompts at a time
    evals: int = 5  # evaluations over the run (eval_steps = total steps / evals)
    max_new_tokens: int = MAX_NEW_TOKENS  # the competition's limit, for the F1 callback and tools.vllm_infer alike
    image_max_pixels: int = 589824  # the recipe's
    infer_batch_size: int = 32


@dataclass
class Variant:
    """--variant NAME="ARGS": a data variant, tools.convert with ARGS added (train_args: the train file's conversion;
    test_args: the test and evaluation conversions, ARGS less TRAIN_ONLY_CONVERT_FLAGS)."""

    name: str
    convert_args: str  # as given ({info_file} kept: the results name no machine's paths)
    train_args: list[str]
    test_args: list[str]
    epochs: float | None = None  # --variant_epochs: its runs' epochs (default: the recipe's)
    reasons: Path | None = None  # --variant_reasons: tools.merge_cot --layout second_turn on its train file

    @property
    def plain(self) -> bool:
        """No conversion arguments and no reasons: the label runs' data, trained for --variant_epochs (e.g. the
        equal-steps control for --augment 1), converted and tokenized once for both."""
        return not self.train_args and self.reasons is None

    def data(self, work: Path) -> Path:
        return work / "data" if self.plain else work / f"data_{self.name}"

    def evald(self, work: Path) -> Path:
        return work / "eval" if self.plain else work / f"eval_{self.name}"


@dataclass
class Plan:
    train_file: Path
    test_file: Path
    image_dir: Path
    test_image_dir: Path
    seeds: list[int]
    name: str
    work: Path
    model_dir: Path
    gguf: Path | None
    info_file: Path | None
    ocr_convert_args: str
    device: str
    smoke: bool
    recipe: Recipe = field(default_factory=Recipe)
    parallel: int = 1  # fine-tuning runs at a time
    variants: list[Variant] = field(default_factory=list)  # --variant, in the order given
    timings: dict = field(default_factory=dict)
    prepare_only: bool = False  # --prepare_only: stop before the first fine-tuning run


_LOG = threading.Lock()


def log(text: str) -> None:
    # sys.__stdout__: an in-process tool's redirect_stdout (run_in_process) must not swallow other threads' lines;
    # one write under a lock: print writes the text and the newline apart, so lines of stages side by side interleaved
    with _LOG:
        sys.__stdout__.write(text + "\n")
        sys.__stdout__.flush()


# ---------------------------------------------------------------------------------------------------------- stages


_IN_PROCESS = threading.Lock()
_TIMINGS = threading.Lock()


class StageFailed(Exception):
    pass


class OutOfGpuMemory(StageFailed):
    """A stage's process ran out of GPU memory: beside other runs, it may fit once they are done."""


# PyTorch's two spellings (torch.OutOfMemoryError's message, the older RuntimeError's)
OOM_MARKERS = ("torch.OutOfMemoryError", "CUDA out of memory")


def run_logged(plan: Plan, name: str, cmd: list[str], env: dict | None = None) -> None:
    """A tool as a subprocess from the repo root, its output in W/logs/NAME.log; on failure the log's tail."""
    path = plan.work / "logs" / f"{name}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "DISABLE_VERSION_CHECK": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    log(f"  $ {' '.join(map(str, cmd))}\n    (log: {path})")
    with open(path, "w", encoding="utf-8") as fh:
        code = subprocess.run([str(c) for c in cmd], cwd=REPO, env=full_env, stdout=fh, stderr=subprocess.STDOUT,
                              check=False).returncode
    if code != 0:
        tail = path.read_text(encoding="utf-8", errors="replace").splitlines()[-25:]
        kind = OutOfGpuMemory if any(m in line for line in tail for m in OOM_MARKERS) else StageFailed
        raise kind(f"{name}: exit code {code}; last lines of {path}:\n" + "\n".join(tail))


def run_in_process(plan: Plan, name: str, module: str, *args) -> None:
    """A light tool (convert, cal_acc) in this process, its output in W/logs/NAME.log: no interpreter start."""
    import contextlib
    import importlib

    path = plan.work / "logs" / f"{name}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    log(f"  $ python -m {module} {' '.join(map(str, args))}\n    (log: {path})")
    # redirect_stdout swaps the process-wide sys.stdout: one in-process tool at a time (runs may be parallel)
    with _IN_PROCESS, open(path, "w", encoding="utf-8") as fh, contextlib.redirect_stdout(fh), \
            contextlib.redirect_stderr(fh):
        code = importlib.import_module(module).main([str(a) for a in args])
    if code:
        raise StageFailed(f"{name}: exit code {code}; see {path}")


def stage(plan: Plan, name: str, done: bool, fn, *args) -> None:
    """Runs fn(*args) unless `done` (its outputs exist); records and prints the wall time."""
    if done:
        earlier = plan.timings.get(name)
        log(f"[{name}] done earlier" + (f" ({earlier:.0f} s then)" if earlier is not None else "") + ", skipped")
        return
    log(f"[{name}] ...")
    start = time.perf_counter()
    fn(*args)
    with _TIMINGS:  # stages run side by side (runs, tokenizations): one writer of the dict and its file at a time
        plan.timings[name] = round(time.perf_counter() - start, 1)
        write_json_atomic(plan.work / "timings.json", plan.timings)
    log(f"[{name}] {plan.timings[name]:.0f} s")


def python_tool(module: str, *args) -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]


def build_model(plan: Plan) -> None:
    if plan.gguf is None:
        raise MireInputError(problem(plan.model_dir, None, None, "no model here; pass --gguf to build one"))
    run_logged(plan, "model", python_tool("tools.make_tiny_model", "--out", plan.model_dir, "--preset", "real-0.5b",
                                          "--gguf", plan.gguf, "--device", plan.device))


def convert_data(plan: Plan, data: Path, evald: Path, extra: list[str], tag: str,
                 test_extra: list[str] | None = None) -> None:
    """tools.convert into `data` (mire_train, mire_test) and `evald` (the labelled test split), which `data`'s
    dataset_info.json registers as EVAL_DATASET (with the evaluation split's own registration: prompt variant, caps).
    The two folders are siblings, so the image paths that tools.convert writes relative to each resolve the same from
    `data` (LLaMA-Factory's media_dir; a derived image of the evaluation split is the test split's, by name).
    `extra` goes to every conversion, `test_extra` (default `extra`) instead to the test and evaluation ones."""
    from mire_factory.dataset_info import read_dataset_info, register

    test_extra = extra if test_extra is None else test_extra

    for path in (data, evald):
        shutil.rmtree(path, ignore_errors=True)
    unlabelled = plan.work / "test_unlabelled.json"
    write_json_atomic(unlabelled, [{k: v for k, v in r.items() if k != "output"} for r in read_json(plan.test_file)])
    run_in_process(plan, f"convert_train{tag}", "tools.convert", "--input_file", plan.train_file, "--image_dir",
                   plan.image_dir, "--output_dir", data, "--val_size", 0, *extra)
    run_in_process(plan, f"convert_test{tag}", "tools.convert", "--input_file", unlabelled, "--image_dir",
                   plan.test_image_dir, "--output_dir", data, *test_extra)
    run_in_process(plan, f"convert_eval{tag}", "tools.convert", "--input_file", plan.test_file, "--image_dir",
                   plan.test_image_dir, "--output_dir", evald, "--val_size", 0, *test_extra)
    register(data, {EVAL_DATASET: {**read_dataset_info(evald)["mire_train"],
                                   "file_name": f"../{evald.name}/mire_train.json"}})


def data_ready(data: Path) -> bool:
    info = data / "dataset_info.json"
    return info.is_file() and {"mire_train", "mire_test", EVAL_DATASET} <= set(json.loads(info.read_text()))


def infer_and_score(plan: Plan, model: Path, data: Path, out: Path, label: str) -> None:
    """tools.vllm_infer --backend hf on mire_test, then tools.cal_acc against the labelled test file."""
    out.mkdir(parents=True, exist_ok=True)
    r = plan.recipe
    run_logged(plan, f"infer_{label}", python_tool(
        "tools.vllm_infer", "--model_name_or_path", model, "--dataset", "mire_test", "--dataset_dir", data,
        "--backend", "hf", "--save_name", out / "predictions.jsonl", "--max_new_tokens", r.max_new_tokens,
        "--cutoff_len", CUTOFF_LEN,
        "--image_max_pixels", r.image_max_pixels, "--batch_size", r.infer_batch_size))
    run_in_process(plan, f"score_{label}", "tools.cal_acc", "--test_file", plan.test_file, "--prediction_file",
                   out / "predictions.jsonl", "--json_file", out / "metrics.json.tmp", "--plot_dir", out)
    os.replace(out / "metrics.json.tmp", out / "metrics.json")  # the stage's done-marker comes last


def run_epochs(plan: Plan, variant: str) -> float:
    """The epochs of a run of `variant` (label, ocr or a --variant's name): its --variant_epochs, else the recipe's."""
    return next((v.epochs for v in plan.variants if v.name == variant and v.epochs is not None), plan.recipe.epochs)


def train_steps(plan: Plan, rows: int | None = None, epochs: float | None = None) -> int:
    """Optimizer steps of a run on `rows` training rows (default: the train file's records; an augmented variant
    has more rows, so more steps an epoch) over `epochs` (default: the recipe's)."""
    r = plan.recipe
    rows = len(read_json(plan.train_file)) if rows is None else rows
    per_epoch = -(-rows // (r.batch_size * r.grad_accum))
    return max(1, int(per_epoch * (r.epochs if epochs is None else epochs))) if not plan.smoke else 2


def train_file_of(data: Path) -> Path:
    """The file registered as mire_train in `data` (a --variant_reasons variant's is merge_cot's output)."""
    info = data / "dataset_info.json"
    entry = read_json(info).get("mire_train") if info.is_file() else None
    return data / (entry["file_name"] if entry else "mire_train.json")


def train_rows(data: Path) -> int:
    return len(read_json(train_file_of(data)))


def train_overrides(plan: Plan, data: Path, out: Path, seed: int, tokenized: Path | None = None,
                    epochs: float | None = None) -> list[str]:
    """configs/qwen2_vl_2b_full_sft.yaml as shipped, except these (Recipe says why for each). The one list both the
    tokenize stage and the training runs use, so the data the runs load is tokenized with their own cutoff_len,
    template, image pixels, datasets and workers. `tokenized`: LLaMA-Factory's tokenized_path (default: the data
    folder's, see tokenized_dir). `epochs`: the run's (default: the recipe's)."""
    r = plan.recipe
    epochs = r.epochs if epochs is None else epochs
    steps = train_steps(plan, train_rows(data), epochs)
    o = {
        "model_name_or_path": plan.model_dir, "dataset_dir": data, "dataset": "mire_train",
        "eval_dataset": EVAL_DATASET, "tokenized_path": tokenized or tokenized_dir(data), "output_dir": out,
        "seed": seed,
        "learning_rate": r.learning_rate, "num_train_epochs": epochs,
        "per_device_train_batch_size": r.batch_size, "gradient_accumulation_steps": r.grad_accum,
        "disable_gradient_checkpointing": str(not r.gradient_checkpointing).lower(),
        "per_device_eval_batch_size": r.eval_batch_size, "eval_steps": max(1, steps // r.evals),
        "image_max_pixels": r.image_max_pixels, "mire_f1_max_new_tokens": r.max_new_tokens,
        "save_strategy": "'no'",  # the final model is saved anyway; checkpoints with optimizer states cost time
        "logging_steps": 5, "report_to": "none", "plot_loss": "true", "overwrite_output_dir": "true",
        "preprocessing_num_workers": 8, "dataloader_num_workers": 4,
        # the output layer and loss at the label positions only: the same loss (tests/test_label_logits.py; on an
        # H200 the packed 7B losses matched the full logits' to bf16 noise), without 151,936 fp32 logits a prompt token
        "mire_label_logits_only": "true",
    }
    if plan.device == "cpu":
        # the recipe's bf16 as CPU autocast, few workers (as tools.demo trains)
        o.update({"use_cpu": "true", "preprocessing_num_workers": 2, "dataloader_num_workers": 0})
    if plan.smoke:
        # 16 records are tokenized in this process: each `datasets` worker would first unpickle the tokenizer and
        # processor (~10 s on 2 cores), longer than tokenizing them takes
        o.update({"max_steps": steps, "logging_steps": 1, "preprocessing_num_workers": 1})
    return [f"{k}={v}" for k, v in o.items()]


def run_dir(plan: Plan, variant: str, seed: int) -> Path:
    """One fine-tuning run: its model (ft/) and its test predictions and scores (infer/)."""
    return plan.work / f"{variant}_s{seed}"


def train_env(plan: Plan) -> dict:
    if plan.device == "cpu":
        from mire_factory.demo import CPU_TRAIN_ENV

        return dict(CPU_TRAIN_ENV)
    return {}


def train(plan: Plan, data: Path, variant: str, seed: int) -> None:
    run = run_dir(plan, variant, seed)
    shutil.rmtree(run, ignore_errors=True)  # a new model: the old run's predictions and scores are stale
    run.mkdir(parents=True)
    epochs = run_epochs(plan, variant)
    run_logged(plan, f"train_{variant}_s{seed}", python_tool("mire_factory.train", RECIPE,
                                                             *train_overrides(plan, data, run / "ft", seed,
                                                                              epochs=epochs)),
               train_env(plan))
    write_json_atomic(run / RUN_SPEC, {"epochs": epochs})


def tokenized_dir(data: Path) -> Path:
    """A data folder's train and evaluation datasets as LLaMA-Factory tokenized them (its save_to_disk folder).
    Inside the data folder, so that converting the data anew (which empties the folder) also drops them."""
    return data / "tokenized"


TOKENIZE_SPEC = "harness_tokenize.json"  # in tokenized_dir: the overrides it was tokenized with


def tokenize_spec(plan: Plan, data: Path) -> list[str]:
    """The overrides that made tokenized_dir(data): a training run's, less what differs between runs (output_dir,
    seed: the seed does not enter LLaMA-Factory's preprocessing of one train and one evaluation dataset without
    val_size or streaming), tokenized_path itself, and the length of training (--variant_epochs), which preprocessing
    does not read."""
    skip = ("output_dir=", "seed=", "tokenized_path=", "num_train_epochs=", "eval_steps=")
    return [o for o in train_overrides(plan, data, plan.work, 0) if not o.startswith(skip)]


def tokenized(plan: Plan, data: Path) -> bool:
    """tokenize's done-marker: a saved dataset, made with the overrides the runs have now."""
    path = tokenized_dir(data)
    if not (path / "dataset_dict.json").is_file() or not (path / TOKENIZE_SPEC).is_file():
        return False
    return read_json(path / TOKENIZE_SPEC).get("overrides") == tokenize_spec(plan, data)


def tokenize(plan: Plan, data: Path, variant: str) -> None:
    """A data variant's train and evaluation datasets tokenized once, for all its runs: each run would otherwise
    tokenize the same data itself (on the H200 four runs side by side did, 3 minutes each at load 105, the GPU
    idle). `python -m mire_factory.train ... mire_tokenize_only=true` calls LLaMA-Factory's get_dataset on exactly
    the arguments a run parses (train_overrides, the one list), rather than a short training run (max_steps), which
    would also load the model and take other arguments than the runs. Written to a .partial folder and renamed
    when complete: LLaMA-Factory loads any non-empty tokenized_path, half-written or not."""
    target = tokenized_dir(data)
    partial = target.with_name(target.name + ".partial")
    scratch = plan.work / f"tokenize_{variant}"  # the output_dir the arguments need; nothing is written there
    for path in (target, partial, scratch):
        shutil.rmtree(path, ignore_errors=True)
    overrides = train_overrides(plan, data, scratch, plan.seeds[0], tokenized=partial)
    run_logged(plan, f"tokenize_{variant}", python_tool("mire_factory.train", RECIPE, *overrides,
                                                        "mire_tokenize_only=true"), train_env(plan))
    if not (partial / "dataset_dict.json").is_file():
        raise StageFailed(f"tokenize_{variant}: no tokenized dataset in {partial}; see "
                          f"{plan.work / 'logs' / f'tokenize_{variant}.log'}")
    write_json_atomic(partial / TOKENIZE_SPEC, {"overrides": tokenize_spec(plan, data)})
    os.replace(partial, target)
    shutil.rmtree(scratch, ignore_errors=True)
    log(f"    tokenized_path of every {variant} run: {target}")  # (the log names the .partial folder it was saved in)


def trained(out: Path) -> bool:
    return (out / "trainer_state.json").is_file() and (out / "config.json").is_file() and any(
        out.glob("model*.safetensors"))


RUN_SPEC = "harness_run.json"  # in a run's folder, written when its training ended: the epochs it trained


def trained_as_planned(plan: Plan, variant: str, seed: int) -> bool:
    """train's done-marker: a saved model trained for the epochs asked for now (a rerun with other --epochs or
    --variant_epochs trains anew)."""
    run = run_dir(plan, variant, seed)
    return trained(run / "ft") and (run / RUN_SPEC).is_file() and \
        read_json(run / RUN_SPEC).get("epochs") == run_epochs(plan, variant)


def ocr_available(plan: Plan) -> str | None:
    """None when the screenshot-text variant can run; else why not."""
    if plan.info_file is None:
        return "no --info_file (screenshot text per image)"
    import contextlib
    import io

    from tools import convert as convert_tool

    flag, help_text = shlex.split(plan.ocr_convert_args)[0], io.StringIO()
    with contextlib.redirect_stdout(help_text), contextlib.suppress(SystemExit):
        convert_tool.main(["--help"])
    if flag not in help_text.getvalue():
        return f"tools.convert has no {flag} yet (the extraction issue's prompt variant)"
    return None


def parse_variant(spec: str, info_file: Path | None) -> Variant:
    """--variant NAME=ARGS, checked before any stage runs: NAME a lower-case identifier the harness does not use
    itself, ARGS tools.convert flags (exact names) that its parser and checks accept. Bad: one line, exit 2."""
    from mire_factory.convert_args import ConvertArguments
    from mire_factory.hparams import make_parser

    def refuse(message: str):
        raise MireInputError(f"--variant {spec!r}: {message}")

    name, sep, given = spec.partition("=")
    text = given
    if not sep:
        refuse('expected NAME="TOOLS.CONVERT ARGS", e.g. augment="--augment 1"')
    if not VARIANT_NAME.fullmatch(name):
        refuse(f"the name {name!r} must be a lower-case identifier (a-z, 0-9, _; a letter first; at most 32)")
    if name in RESERVED_VARIANTS:
        refuse(f"the name {name!r} is the harness's own; choose another")
    if "{info_file}" in text:
        if info_file is None:
            refuse("{info_file} needs --info_file")
        text = text.replace("{info_file}", shlex.quote(str(info_file)))
    try:
        tokens = shlex.split(text)
    except ValueError as exc:
        refuse(f"cannot split the arguments ({exc})")
    parser = make_parser(ConvertArguments, add_help=False, exit_on_error=False)
    known = {o for a in parser._actions for o in a.option_strings}
    for token in tokens:
        flag = token.split("=", 1)[0]
        if token.startswith("-") and flag not in known and not _number(token):
            refuse(f"tools.convert has no flag {flag} (give flags in full; python -m tools.convert --help lists them)")
        if flag.replace("-", "_").replace("__", "--", 1) in HARNESS_CONVERT_FLAGS:
            refuse(f"{flag} is set by the harness for each conversion; leave it out")
    fields = {f.name for f in ConvertArguments.__dataclass_fields__.values()}
    try:
        namespace, unknown = parser.parse_known_args(["--input_file", "-", "--image_dir", "-", "--output_dir", "-",
                                                      *tokens])
        if not unknown:
            ConvertArguments(**{k: v for k, v in vars(namespace).items() if k in fields})
    except (argparse.ArgumentError, MireInputError, ValueError) as exc:
        refuse(f"tools.convert refuses it: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    if unknown:
        refuse(f"tools.convert does not take {' '.join(unknown)}")
    test_tokens, skip = [], False
    for token in tokens:
        flag = token.split("=", 1)[0].replace("-", "_").replace("__", "--", 1)
        if skip:
            skip = False
        elif flag in TRAIN_ONLY_CONVERT_FLAGS:
            skip = "=" not in token  # its value is the next token
        else:
            test_tokens.append(token)
    return Variant(name, given, tokens, test_tokens)


def set_variant_epochs(variants: list[Variant], spec: str) -> None:
    """--variant_epochs NAME=EPOCHS onto the --variant NAME; bad: one line, exit 2."""
    name, _, text = spec.partition("=")
    try:
        epochs = float(text)
    except ValueError:
        epochs = 0.0
    if not epochs > 0 or epochs != epochs or epochs == float("inf"):
        raise MireInputError(f"--variant_epochs {spec!r}: expected NAME=EPOCHS with EPOCHS a number above 0")
    variant = next((v for v in variants if v.name == name), None)
    if variant is None:
        raise MireInputError(f"--variant_epochs {spec!r}: no --variant named {name!r}")
    if variant.epochs is not None:
        raise MireInputError(f"--variant_epochs {spec!r}: {name!r} is given twice")
    variant.epochs = epochs


def set_variant_reasons(variants: list[Variant], spec: str) -> None:
    """--variant_reasons NAME=REASONS_JSONL onto the --variant NAME; bad: one line, exit 2."""
    name, sep, text = spec.partition("=")
    variant = next((v for v in variants if v.name == name), None)
    if not sep or not text:
        raise MireInputError(f"--variant_reasons {spec!r}: expected NAME=REASONS_JSONL")
    if variant is None:
        raise MireInputError(f"--variant_reasons {spec!r}: no --variant named {name!r}")
    if variant.reasons is not None:
        raise MireInputError(f"--variant_reasons {spec!r}: {name!r} is given twice")
    path = Path(text).absolute()
    if not path.is_file():
        raise MireInputError(problem(path, None, None, f"--variant_reasons {name}: file not found"))
    from mire_factory.reasons import load_reasons

    load_reasons(path)  # a bad line is refused here, in one line, not at the merge stage
    variant.reasons = path


def check_variant_has_work(v: Variant) -> None:
    if v.plain and v.epochs is None:
        raise MireInputError(f"--variant {v.name + '=' + v.convert_args!r}: no tools.convert arguments, "
                             "--variant_reasons or --variant_epochs (the plain data is the fine_tuned row already)")


def _number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


VARIANT_SPEC = "harness_variant.json"  # in a variant's data folder: the arguments it was converted with


def check_variant_specs(plan: Plan) -> None:
    """A variant's finished stages are reused on rerun only for the same arguments: another ARGS under a NAME the
    work folder already has is refused (its runs would mix two data variants)."""
    for v in plan.variants:
        path = v.data(plan.work) / VARIANT_SPEC
        if path.is_file() and not v.plain:
            spec = json.loads(path.read_text(encoding="utf-8"))
            before = spec.get("convert_args")
            if spec.get("reasons") != (v.reasons and v.reasons.name):
                raise MireInputError(problem(plan.work, None, None, f"--variant {v.name}: this work folder merged "
                                             f"reasons {spec.get('reasons')!r} into it, not "
                                             f"{v.reasons and v.reasons.name!r}; use another name or --workdir"))
            if before != v.convert_args:
                raise MireInputError(problem(plan.work, None, None, f"--variant {v.name}: this work folder converted "
                                             f"it with {before!r}, not {v.convert_args!r}; use another name or "
                                             "--workdir"))


def convert_variant(plan: Plan, v: Variant) -> None:
    data = v.data(plan.work)
    convert_data(plan, data, v.evald(plan.work), v.train_args, f"_{v.name}", v.test_args)
    if v.reasons is not None:
        # the reasoned train file is registered as mire_train (what every run trains on); the test and evaluation
        # files stay plain: inference asks the first exchange only
        run_in_process(plan, f"merge_cot_{v.name}", "tools.merge_cot", "--layout", "second_turn", "--dataset_file",
                       data / "mire_train.json", "--reasons_file", v.reasons, "--output_file",
                       data / "mire_train_reason.json", "--dataset_name", "mire_train")
    write_json_atomic(data / VARIANT_SPEC, {"convert_args": v.convert_args, "train_args": v.train_args,
                                            "test_args": v.test_args, "reasons": v.reasons and v.reasons.name})


def variant_ready(plan: Plan, v: Variant) -> bool:
    return data_ready(v.data(plan.work)) and (v.data(plan.work) / VARIANT_SPEC).is_file()


def run_anchor(plan: Plan, seed: int) -> None:
    from benchmarks.quality.tfidf_anchor import run_anchor as anchor

    write_json_atomic(plan.work / "anchor" / f"seed{seed}.json",
                      anchor(plan.train_file, plan.test_file, plan.info_file, seed))


# ---------------------------------------------------------------------------------------------------------- report


def spread(values: dict) -> dict:
    xs = [v for v in values.values() if v is not None]
    if not xs:
        return {"mean": None, "per_seed": values}
    return {"mean": round(statistics.fmean(xs), 4), "std": round(statistics.stdev(xs), 4) if len(xs) > 1 else 0.0,
            "min": round(min(xs), 4), "max": round(max(xs), 4), "per_seed": values}


def metrics_f1(path: Path) -> dict:
    m = json.loads(path.read_text(encoding="utf-8"))
    return {task: round(m[task]["f1"], 4) if m.get(task) else None for task in TASKS}


def summarize(per_seed: dict[str, Path]) -> dict:
    """{task: {mean, std, min, max, per_seed}} from tools.cal_acc metrics files, keyed by seed."""
    scores = {seed: metrics_f1(path) for seed, path in per_seed.items() if path.is_file()}
    return {task: spread({seed: s[task] for seed, s in scores.items()}) for task in TASKS}


def run_labels(seeds: list, ocr: bool, variants: list[str]) -> dict[str, str]:
    """The report's run names ("seed 0", "seed 0, screenshot text", "seed 0, NAME") -> their run folders
    (`run_dir`'s names: label_s0, ocr_s0, NAME_s0), in the report's order."""
    runs = {f"seed {s}": f"label_s{s}" for s in seeds}
    if ocr:
        runs.update({f"seed {s}, screenshot text": f"ocr_s{s}" for s in seeds})
    for name in variants:
        runs.update({f"seed {s}, {name}": f"{name}_s{s}" for s in seeds})
    return runs


def eval_curve(trainer_state: Path) -> list[dict]:
    if not trainer_state.is_file():
        return []
    history = json.loads(trainer_state.read_text(encoding="utf-8")).get("log_history", [])
    keys = ("eval_f1", "eval_f1_dialogue", "eval_f1_image", "eval_loss")
    return [{"step": h["step"], **{k: h[k] for k in keys if k in h}} for h in history if "eval_f1" in h]


def loss_curve(trainer_state: Path) -> list[dict]:
    """The training loss at each logged optimizer step ({"step", "loss"}; a loss that is not finite is None, JSON's
    null); [] when the run has no trainer state."""
    if not trainer_state.is_file():
        return []
    history = read_json(trainer_state).get("log_history", [])
    return [{"step": h["step"], "loss": round(h["loss"], 4) if math.isfinite(h["loss"]) else None}
            for h in history if "loss" in h]


def callback_agreement(plan: Plan, ft: Path, predictions: Path) -> dict | None:
    """The F1 callback's last labels (training's prompts) against tools.vllm_infer's (inference's), record by record."""
    from mire_factory.predictions import load_answers
    from mire_factory.records import load_records

    files = sorted((ft / "f1_eval").glob("*_step*.jsonl"), key=lambda p: int(p.stem.rsplit("step", 1)[1]))
    if not files or not predictions.is_file():
        return None
    rows = [json.loads(line) for line in files[-1].read_text(encoding="utf-8").splitlines() if line.strip()]
    records = load_records(plan.test_file, None, kind="train")
    answers, _, _ = load_answers(records, predictions)
    tools_labels = [a.label for a in answers]  # None when invalid, as the callback writes it
    callback = {row["index"]: row["predict"] for row in rows}
    same = sum(callback.get(i) == label for i, label in enumerate(tools_labels))
    return {"step": int(files[-1].stem.rsplit("step", 1)[1]), "records": len(records), "same_label": same,
            "agreement": round(same / len(records), 4)}


def plot_curves(curves: dict[str, list[dict]], lines: dict[str, float], path: Path,
                losses: dict[str, list[dict]] | None = None) -> Path | None:
    if not any(curves.values()) and not any((losses or {}).values()):
        return None
    with atomic_path(path) as tmp:
        plot_eval_f1_curves(curves, lines, tmp, losses)
    return path


def plot_lines(untrained: dict, tfidf: dict) -> dict[str, float | None]:
    """The plot's horizontal references: the untrained model's F1 per task, the TF-IDF anchor's on dialogues."""
    return {"dialogue: untrained": untrained["dialogue"]["mean"], "image: untrained": untrained["image"]["mean"],
            "dialogue: TF-IDF anchor": tfidf["dialogue"].get("mean")}


def report(plan: Plan, ocr_reason: str | None, results_dir: Path) -> dict:
    seeds = [str(s) for s in plan.seeds]
    untrained = summarize({"all": plan.work / "untrained" / "metrics.json"})
    untrained["note"] = "greedy decoding: one run serves every seed"
    fine_tuned = summarize({s: run_dir(plan, "label", s) / "infer" / "metrics.json" for s in seeds})
    if ocr_reason:
        fine_tuned_ocr = {"not_run": ocr_reason}
    else:
        fine_tuned_ocr = summarize({s: run_dir(plan, "ocr", s) / "infer" / "metrics.json" for s in seeds})
    anchors = {s: json.loads((plan.work / "anchor" / f"seed{s}.json").read_text(encoding="utf-8")) for s in seeds}
    tfidf = {}
    for task in ("image", "dialogue", "dialogue_whole"):
        parts = {s: a.get(task, {}) for s, a in anchors.items()}
        if all("unavailable" in p for p in parts.values()):
            tfidf[task] = {"unavailable": next(iter(parts.values()))["unavailable"]}
        else:
            tfidf[task] = spread({s: round(p["f1"], 4) if "f1" in p else None for s, p in parts.items()})
    tfidf["settings"] = next(iter(anchors.values()))["settings"]

    variants = {v.name: variant_report(plan, v, fine_tuned) for v in plan.variants}

    states = {label: plan.work / run / "ft" / "trainer_state.json"
              for label, run in run_labels(seeds, not ocr_reason, [v.name for v in plan.variants]).items()}
    curves = {label: eval_curve(state) for label, state in states.items()}
    losses = {label: loss_curve(state) for label, state in states.items()}
    lines = plot_lines(untrained, tfidf)
    png = plot_curves(curves, lines, results_dir / f"{plan.name}_eval_f1.png", losses)

    ft_d, anchor_d, untrained_d = fine_tuned["dialogue"]["mean"], tfidf["dialogue"].get("mean"), lines[
        "dialogue: untrained"]
    targets = {}
    if None not in (ft_d, anchor_d, untrained_d) and not plan.smoke:  # a smoke run's scores measure nothing
        targets = {
            "dialogue_vs_anchor": {"need": round(anchor_d + 0.10, 4), "got": ft_d, "met": ft_d >= anchor_d + 0.10},
            "dialogue_vs_untrained": {"need": round(untrained_d + 0.30, 4), "got": ft_d,
                                      "met": ft_d >= untrained_d + 0.30},
        }
    per_seed_stages = tuple(f"{step}_{name}_s{{s}}" for name in ("label", "ocr", *(v.name for v in plan.variants))
                            for step in ("train", "infer"))
    seed_s = [sum(plan.timings.get(k.format(s=s), 0.0) for k in per_seed_stages) for s in seeds]
    shared = sum(plan.timings.get(k, 0.0) for k in ("model", "untrained"))
    split = {name: _split_counts(path) for name, path in (("train", plan.train_file), ("test", plan.test_file))}
    result = {
        "name": plan.name, "smoke": plan.smoke, "device": device_name(plan.device), "seeds": plan.seeds,
        "model": {"dir": shown(plan.model_dir), "gguf": shown(plan.gguf) if plan.gguf else None,
                  "preset": "real-0.5b (Qwen2.5-Coder-0.5B-Instruct Q4_K_M, dequantized; random vision tower)"},
        "split": split,
        "recipe": {"config": str(RECIPE.relative_to(REPO)), "overrides": asdict(plan.recipe),
                   "train_steps": train_steps(plan)},
        "untrained": untrained, "fine_tuned": fine_tuned, "fine_tuned_ocr": fine_tuned_ocr, "tfidf_anchor": tfidf,
        "variants": variants,
        "targets": targets,
        "eval_f1_curves": curves,
        "loss_curves": losses,
        "callback_vs_tools": {s: callback_agreement(plan, run_dir(plan, "label", s) / "ft",
                                                    run_dir(plan, "label", s) / "infer" / "predictions.jsonl")
                              for s in seeds},
        "timings_s": plan.timings,
        "seconds_per_seed": {"train_and_infer_all_variants": dict(zip(seeds, seed_s, strict=True)),
                             "shared_model_and_untrained": round(shared, 1)},
        "plot": shown(png) if png else None,
    }
    write_json_atomic(results_dir / f"{plan.name}.json", result)
    return result


def replot(results_json: Path, runs_dir: Path) -> Path:
    """A finished run's report drawn again, no GPU needed: each run's loss curve from RUNS_DIR/RUN/ft/
    trainer_state.json (RUN as `run_labels` names it for the runs in `eval_f1_curves`) is stored as `loss_curves`
    and RESULTS_eval_f1.png beside the JSON is drawn anew; every other key is left as it was. Returns the png."""
    result = read_json(results_json)
    if not isinstance(result, dict) or not isinstance(result.get("eval_f1_curves"), dict):
        raise MireInputError(problem(results_json, None, "eval_f1_curves", "missing: not a quality harness result"))
    for key in ("seeds", "untrained", "tfidf_anchor", "fine_tuned_ocr", "variants"):
        if key not in result:
            raise MireInputError(problem(results_json, None, key, "missing: not a quality harness result"))
    runs = run_labels(result["seeds"], "not_run" not in result["fine_tuned_ocr"], list(result["variants"]))
    unknown = [label for label in result["eval_f1_curves"] if label not in runs]
    if unknown:
        raise MireInputError(problem(results_json, None, "eval_f1_curves", f"run {unknown[0]!r} is none of the "
                                     "harness's run names (seed N, seed N, screenshot text, seed N, VARIANT)"))
    states = {label: runs_dir / runs[label] / "ft" / "trainer_state.json" for label in result["eval_f1_curves"]}
    missing = [str(path) for path in states.values() if not path.is_file()]
    if missing:
        raise MireInputError([problem(path, None, None, "not found (--runs_dir holds RUN/ft/trainer_state.json per "
                                      "run)") for path in missing])
    result["loss_curves"] = {label: loss_curve(state) for label, state in states.items()}
    png = results_json.with_name(f"{results_json.stem}_eval_f1.png")
    with OutputSet() as outs:  # the png and the JSON together, or neither
        plot_eval_f1_curves(result["eval_f1_curves"], plot_lines(result["untrained"], result["tfidf_anchor"]),
                            outs.path(png), result["loss_curves"])
        outs.write_json(results_json, result)
    return png


def variant_report(plan: Plan, v: Variant, fine_tuned: dict) -> dict:
    """A --variant's F1 per task (as `fine_tuned`), its arguments, and its difference against `fine_tuned`: of the
    means, and seed by seed (the same seed, the other data)."""
    seeds = [str(s) for s in plan.seeds]
    scores = summarize({s: run_dir(plan, v.name, s) / "infer" / "metrics.json" for s in seeds})
    diff = {}
    for task in TASKS:
        mine, base = scores[task], fine_tuned[task]
        per_seed = {s: round(mine["per_seed"][s] - base["per_seed"][s], 4)
                    for s in seeds if mine["per_seed"].get(s) is not None and base["per_seed"].get(s) is not None}
        mean = None if None in (mine["mean"], base["mean"]) else round(mine["mean"] - base["mean"], 4)
        diff[task] = {"mean": mean, "per_seed": per_seed}
    data = v.data(plan.work)
    rows = train_rows(data) if data_ready(data) else None
    return {**scores, "convert_args": v.convert_args, "test_convert_args": shlex.join(v.test_args),
            "reasons_second_turn": v.reasons and v.reasons.name,
            "epochs": run_epochs(plan, v.name),
            "train_rows": rows, "train_steps": train_steps(plan, rows, run_epochs(plan, v.name)) if rows is not None else None,
            "vs_fine_tuned": diff}


def shown(path: Path) -> str:
    """A path for the results file: relative to the repo when inside it (no machine's home in committed files)."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _split_counts(path: Path) -> dict:
    from collections import Counter

    from mire_factory.taxonomy import task_of_label

    return dict(Counter(task_of_label(r["output"]) for r in read_json(path)))


def device_name(device: str) -> str:
    if device == "cpu":
        return f"CPU ({os.cpu_count()} cores)"
    import torch

    return torch.cuda.get_device_name(0)


def print_table(result: dict) -> None:
    log(f"\n{'weighted F1 (test split)':32} {'image':>16} {'dialogue':>16} {'overall':>16}")
    for key in ("untrained", "fine_tuned", "fine_tuned_ocr", "tfidf_anchor"):
        part = result[key]
        if "not_run" in part:
            log(f"{key:32} not run: {part['not_run']}")
            continue
        cells = []
        for task in TASKS:
            s = part.get(task) or {}
            if "unavailable" in s:
                cells.append(f"{'unavailable':>16}")
            else:
                cells.append(_cell(s))
        log(f"{key:32} " + " ".join(cells))
    for name, part in result["variants"].items():
        log(f"{'variant ' + name:32} " + " ".join(_cell(part.get(task) or {}) for task in TASKS))
        log(f"{'  minus fine_tuned':32} " + " ".join(
            f"{'-':>16}" if part["vs_fine_tuned"][task]["mean"] is None else
            f"{part['vs_fine_tuned'][task]['mean']:>+8.4f}".ljust(13).rjust(16) for task in TASKS))
        log(f"{'':32} ({part['convert_args']})")
    for name, t in result["targets"].items():
        log(f"target {name}: need {t['need']:.4f}, got {t['got']:.4f}: {'met' if t['met'] else 'MISSED'}")
    for seed, agreement in result["callback_vs_tools"].items():
        if agreement:
            log(f"seed {seed}: F1 callback (training prompts) and tools.vllm_infer agree on "
                f"{agreement['same_label']}/{agreement['records']} labels")


def _cell(s: dict) -> str:
    if s.get("mean") is None:
        return f"{'-':>16}"
    return f"{s['mean']:>8.4f} ±{s.get('std', 0):.3f}".rjust(16)


# ------------------------------------------------------------------------------------------------------------ main


def smoke_files(plan: Plan) -> None:
    """--smoke: the first records of each task (8 + 8 train, 4 + 4 test)."""
    from mire_factory.taxonomy import task_of_label

    for name, per_task in (("train", 8), ("test", 4)):
        source = plan.train_file if name == "train" else plan.test_file
        raw = read_json(source)
        picked = [r for task in ("image", "dialogue") for r in [x for x in raw if task_of_label(x["output"]) == task]
                  [:per_task]]
        target = plan.work / "smoke" / f"{name}.json"
        write_json_atomic(target, picked)
        setattr(plan, f"{name}_file", target)


def run(plan: Plan, results_dir: Path) -> dict:
    from filelock import FileLock, Timeout

    plan.work.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(plan.work / ".harness.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise MireInputError(problem(plan.work, None, None, "another harness is running in this work folder")) from None
    try:
        return _run(plan, results_dir)
    finally:
        lock.release()


def fine_tune_one(plan: Plan, variant: str, data: Path, seed: int) -> None:
    run = run_dir(plan, variant, seed)
    stage(plan, f"train_{variant}_s{seed}", trained_as_planned(plan, variant, seed), train, plan, data, variant, seed)
    stage(plan, f"infer_{variant}_s{seed}", (run / "infer" / "metrics.json").is_file(),
          infer_and_score, plan, run / "ft", data, run / "infer", f"{variant}_s{seed}")


def side_by_side(plan: Plan, jobs: list[tuple], parallel: int | None = None,
                 set_aside: type[Exception] | None = None) -> list[tuple[tuple, Exception]]:
    """Each job (fn, *args) called, `parallel` (default plan.parallel) at a time (in order when 1). Each job runs its
    own subprocesses; the first failure is raised after the others finish, except that with more than one at a time
    the jobs failing with `set_aside` are returned with their errors instead."""
    parallel = plan.parallel if parallel is None else parallel
    if parallel <= 1 or len(jobs) <= 1:
        for fn, *args in jobs:
            fn(*args)
        return []
    from concurrent.futures import ThreadPoolExecutor

    aside, first_error = [], None
    with ThreadPoolExecutor(min(parallel, len(jobs))) as pool:
        futures = [(job, pool.submit(*job)) for job in jobs]
    for job, future in futures:
        error = future.exception()
        if error is None:
            continue
        if set_aside is not None and isinstance(error, set_aside):
            aside.append((job, error))
        elif first_error is None:
            first_error = error
    if first_error is not None:
        raise first_error
    return aside


def side_by_side_retrying_oom(plan: Plan, jobs: list[tuple]) -> None:
    """side_by_side, and the jobs that ran out of GPU memory beside others again after them, half as many at a time
    (down to one, whose failure is raised): a --parallel too high for the GPU costs time, not the finished runs."""
    parallel = plan.parallel
    while jobs:
        aside = side_by_side(plan, jobs, parallel, set_aside=OutOfGpuMemory)
        jobs = [job for job, _ in aside]
        if jobs:
            parallel = max(1, parallel // 2)
            log(f"[retry] {len(jobs)} run(s) ran out of GPU memory beside others "
                f"({', '.join(str(e).split(':', 1)[0] for _, e in aside)}): again, {parallel} at a time")


def fine_tune_all(plan: Plan, runs: list[tuple[str, Path, int]]) -> None:
    """Every (variant, data, seed) run, `plan.parallel` at a time: a 0.5B run leaves most of an H200 idle (its steps
    are launch-bound), so runs side by side finish in about the time of one."""
    side_by_side_retrying_oom(plan, [(fine_tune_one, plan, variant, data, seed) for variant, data, seed in runs])


def _run(plan: Plan, results_dir: Path) -> dict:
    check_variant_specs(plan)
    timings_path = plan.work / "timings.json"
    plan.timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    if plan.smoke:
        smoke_files(plan)
    start = time.perf_counter()
    stage(plan, "model", (plan.model_dir / "config.json").is_file(), build_model, plan)
    data, evald = plan.work / "data", plan.work / "eval"
    stage(plan, "data", data_ready(data), convert_data, plan, data, evald, [], "")
    for seed in plan.seeds:
        stage(plan, f"anchor_s{seed}", (plan.work / "anchor" / f"seed{seed}.json").is_file(), run_anchor, plan, seed)
    stage(plan, "untrained", (plan.work / "untrained" / "metrics.json").is_file(),
          infer_and_score, plan, plan.model_dir, data, plan.work / "untrained", "untrained")
    runs = [("label", data, seed) for seed in plan.seeds]
    ocr_reason = ocr_available(plan)
    if ocr_reason:
        log(f"[ocr] not run: {ocr_reason}")
    else:
        extra = shlex.split(plan.ocr_convert_args.format(info_file=shlex.quote(str(plan.info_file))))
        data_ocr = plan.work / "data_ocr"
        stage(plan, "data_ocr", data_ready(data_ocr), convert_data, plan, data_ocr, plan.work / "eval_ocr", extra,
              "_ocr")
        runs += [("ocr", data_ocr, seed) for seed in plan.seeds]
    for v in plan.variants:
        if not v.plain:
            stage(plan, f"data_{v.name}", variant_ready(plan, v), convert_variant, plan, v)
        runs += [(v.name, v.data(plan.work), seed) for seed in plan.seeds]
    # one tokenization per data folder (a plain --variant trains the label runs' data), named by its first variant
    first: dict[Path, str] = {}
    for variant, variant_data, _ in runs:
        first.setdefault(variant_data, variant)
    # side by side too: each is a CPU-bound LLaMA-Factory preprocessing (about 95 s on the H200's host, 3 variants
    # in a row were 5 minutes of an idle GPU)
    side_by_side(plan, [(stage, plan, f"tokenize_{variant}", tokenized(plan, variant_data), tokenize, plan,
                         variant_data, variant) for variant_data, variant in first.items()])
    if plan.prepare_only:
        log(f"\nprepared (--prepare_only): {time.perf_counter() - start:.0f} s; the same command without it trains "
            f"the {len(runs)} runs")
        return {}
    fine_tune_all(plan, runs)
    result = report(plan, ocr_reason, results_dir)
    print_table(result)
    log(f"\nharness: {time.perf_counter() - start:.0f} s this run; stage times (s): {json.dumps(plan.timings)}")
    log(f"wrote {results_dir / (plan.name + '.json')}" + (f" and {result['plot']}" if result["plot"] else ""))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replot", type=Path, metavar="RESULTS_JSON",
                   help="no run: store the runs' loss curves in this finished result (loss_curves) from --runs_dir "
                        "and draw its NAME_eval_f1.png beside it again; no other flag is needed")
    p.add_argument("--runs_dir", type=Path, help="with --replot: the folder of the runs (RUN/ft/trainer_state.json, "
                                                  "RUN e.g. label_s0, ocr_s1)")
    p.add_argument("--train_file", type=Path, help="MIRE json with labels (benchmarks/quality/"
                   "prepare_data.py writes train.json; required unless --replot)")
    p.add_argument("--test_file", type=Path, help="MIRE json with gold labels (test.json; required unless --replot)")
    p.add_argument("--image_dir", type=Path, help="the train file's images (required unless --replot)")
    p.add_argument("--test_image_dir", type=Path, help="the test file's images (default: --image_dir)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", help="NAME of benchmarks/quality/results/NAME.json (required unless --replot)")
    p.add_argument("--workdir", type=Path, help="stage outputs (default: .quality_work/NAME in the repo)")
    p.add_argument("--model_dir", type=Path, help="a built real-0.5b Qwen2-VL (default: WORKDIR/../model)")
    p.add_argument("--gguf", type=Path, help="the GGUF to build the model from when --model_dir has none")
    p.add_argument("--info_file", type=Path, help="JSON lines {\"image\": name, \"text\": screenshot text}")
    p.add_argument("--ocr_convert_args", default=OCR_CONVERT_ARGS,
                   help="tools.convert's arguments for the screenshot-text variant ({info_file} is replaced)")
    p.add_argument("--variant", action="append", default=[], metavar='NAME="ARGS"',
                   help="a data variant, repeatable: tools.convert with ARGS added (train, test and evaluation split; "
                        f"{', '.join(TRAIN_ONLY_CONVERT_FLAGS)} on the train file only), trained per seed and reported "
                        "under variants.NAME, e.g. augment=\"--augment 1\" ({info_file} is replaced)")
    p.add_argument("--variant_epochs", action="append", default=[], metavar="NAME=EPOCHS",
                   help="a --variant's runs train EPOCHS epochs instead of the recipe's, e.g. plain6=6 with "
                        "--variant plain6= (empty ARGS: the label runs' data): as many steps as --augment 1 at 3")
    p.add_argument("--variant_reasons", action="append", default=[], metavar="NAME=REASONS_JSONL",
                   help="a --variant's train file gets these reasons as a second exchange (tools.merge_cot --layout "
                        "second_turn; records without a usable reason dropped, as merge_cot does); its test and "
                        "evaluation files stay as converted, e.g. reason=\"\" with reason=reasons.jsonl")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--results_dir", type=Path, default=RESULTS)
    p.add_argument("--parallel", type=int, default=1,
                   help="fine-tuning runs (seeds x variants) side by side on the one GPU (a 0.5B run leaves it idle); "
                        "at most 4 on a 141 GB H200 at --batch_size 2 (about 30 GiB a run; 5 ran out of memory); a run that "
                        "runs out of GPU memory beside others goes again after them, half as many at a time")
    p.add_argument("--prepare_only", action="store_true",
                   help="stop before the first fine-tuning run (model, data, anchors, untrained pass, tokenization): "
                        "on a shared GPU, the stages that need little of it; rerun without it to train")
    p.add_argument("--smoke", action="store_true",
                   help="tiny scale, to prove the stages: 16 train and 8 test records, 2 optimizer steps, images at "
                        "224x224 pixels, 16 new tokens")
    for f in Recipe.__dataclass_fields__.values():
        p.add_argument(f"--{f.name}", type=type(f.default) if not isinstance(f.default, bool) else _bool,
                       default=f.default, help=f"recipe override (default {f.default})")
    args = p.parse_args(argv)
    if args.replot:
        if args.runs_dir is None:
            p.error("--replot needs --runs_dir")
        png = replot(args.replot, args.runs_dir)
        log(f"wrote loss_curves into {args.replot} and drew {png}")
        return 0
    if args.runs_dir is not None:
        p.error("--runs_dir goes with --replot only")
    absent = [f"--{name}" for name in ("train_file", "test_file", "image_dir", "out") if getattr(args, name) is None]
    if absent:
        p.error(f"the following arguments are required: {', '.join(absent)}")
    for path in (args.train_file, args.test_file):
        if not path.is_file():
            raise MireInputError(problem(path, None, None, "file not found"))
    info_file = args.info_file.absolute() if args.info_file else None
    variants = [parse_variant(spec, info_file) for spec in args.variant]
    names = [v.name for v in variants]
    if len(set(names)) < len(names):
        raise MireInputError(f"--variant: the name {next(n for n in names if names.count(n) > 1)!r} is given twice")
    for spec in args.variant_epochs:
        set_variant_epochs(variants, spec)
    for spec in args.variant_reasons:
        set_variant_reasons(variants, spec)
    for v in variants:
        check_variant_has_work(v)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    work = (args.workdir or REPO / ".quality_work" / args.out).absolute()
    recipe = Recipe(**{f: getattr(args, f) for f in Recipe.__dataclass_fields__})
    if args.smoke:
        recipe.batch_size, recipe.eval_batch_size, recipe.evals = 2, 4, 1
        recipe.max_new_tokens, recipe.image_max_pixels, recipe.infer_batch_size = 16, 224 * 224, 8
    plan = Plan(train_file=args.train_file.absolute(), test_file=args.test_file.absolute(),
                image_dir=args.image_dir.absolute(), test_image_dir=(args.test_image_dir or args.image_dir).absolute(),
                seeds=args.seeds, name=args.out, work=work,
                model_dir=(args.model_dir or work.parent / "model").absolute(),
                gguf=args.gguf.absolute() if args.gguf else None,
                info_file=info_file, ocr_convert_args=args.ocr_convert_args, device=args.device, smoke=args.smoke,
                recipe=recipe, parallel=max(1, args.parallel), variants=variants, prepare_only=args.prepare_only)
    try:
        run(plan, args.results_dir)
    except StageFailed as exc:
        print(f"error: stage {exc}", file=sys.stderr)
        return 1
    return 0


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1")


if __name__ == "__main__":
    run_cli(main)
