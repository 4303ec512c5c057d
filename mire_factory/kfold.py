"""Out-of-fold label check: K stratified folds of a train file; per fold (and seed) tools.convert, a LLaMA-Factory
training on the other folds with any recipe, and tools.vllm_infer on the held-out fold; records whose out-of-fold
predictions agree on another label than gold become suspects in the corrections-file format (corrections.py).

Layout of the output folder (everything a rerun needs to resume; a (fold, seed) with its done.json is skipped):
    folds.json                      the split: input file, K, split seed, record id -> fold
    fold_K/train.json, heldout.json the fold's MIRE files (held-out without labels: a test file)
    fold_K/data/                    tools.convert's output of both (mire_train, mire_test), with --convert_flags
                                    (the train-only ones, e.g. --augment, on mire_train alone)
    fold_K/seed_S/model/            the trained model; train.log its training's output
    fold_K/seed_S/predictions.jsonl tools.vllm_infer's; done.json once it is complete
    oof_predictions.jsonl           one line per (record, seed): fold, gold, predicted label, raw answer
    suspects.jsonl, review.html     the suspects and their review page; summary.json
"""

from __future__ import annotations

import os
import random
import shlex
import subprocess
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .convert import variant_with_info
from .corrections import Correction, apply_corrections, read_corrections, write_corrections
from .dataset_info import format_caps
from .io import MireInputError, OutputSet, output_lock, problem, read_json, write_json_atomic
from .predictions import load_answers
from .records import MireRecord, read_mire_file
from .review_page import review_html

REPO = Path(__file__).resolve().parents[1]
LAUNCHERS = ("llamafactory-cli", "mire_factory.train")
# Each fold trains on the other folds whole: no validation split, so no evaluation (the held-out fold is the test).
FIXED_OVERRIDES = ("eval_dataset=null", "eval_strategy='no'")  # quoted: YAML reads a bare no as false
# tools.convert flags kfold sets itself (per fold), or that would make a fold's data other than mire_train/mire_test.
KFOLD_CONVERT_FLAGS = {
    "input_file": "each fold's own train.json / heldout.json", "image_dir": "tools.kfold's --image_dir",
    "output_dir": "each fold's data folder", "val_size": "0: the held-out fold is the test",
    "kind": "train for the other folds, test for the held-out one", "task": "all: both tasks train together",
    "format": "sharegpt: LLaMA-Factory reads it", "prompt_variant": "tools.kfold's --prompt_variant",
    "config": "give its flags in --convert_flags", "corrections_file": "tools.kfold's --corrections_file"}
# tools.convert flags that act on a train file's train split only: the held-out fold's conversion never gets them.
TRAIN_ONLY_CONVERT_FLAGS = ("augment", "augment_mask_ratio", "seed")
PATH_CONVERT_FLAGS = ("info_file",)  # resolved: the conversions run in the repository root


@dataclass
class KFoldArgs:
    input_file: str = field(metadata={"help": "a labelled MIRE train json"})
    image_dir: str = field(metadata={"help": "its images"})
    output_dir: str = field(metadata={"help": "folds, models, predictions, suspects (a rerun resumes here)"})
    model_name_or_path: str = field(metadata={"help": "the base model every fold trains from"})
    recipe: str = field(default="configs/qwen2_vl_full_sft.yaml", metadata={"help": "LLaMA-Factory training YAML"})
    folds: int = field(default=5, metadata={"help": "K"})
    seeds: list[int] = field(default_factory=lambda: [42], metadata={
        "help": "training seeds; with several, a suspect needs --min_agreement of them on the same wrong label"})
    split_seed: int = field(default=42, metadata={"help": "seed of the stratified fold assignment"})
    min_agreement: float = field(default=1.0, metadata={
        "help": "share of the seeds whose out-of-fold label must be the same non-gold label (1.0: all)"})
    launcher: str = field(default="llamafactory-cli", metadata={
        "help": "llamafactory-cli train RECIPE, or python -m mire_factory.train RECIPE (adds per-task F1)",
        "choices": LAUNCHERS})
    train_overrides: list[str] = field(default_factory=list, metadata={
        "help": "key=value overrides of the recipe for every fold (e.g. deepspeed=null max_steps=100)"})
    prompt_variant: str = field(default="plain", metadata={"help": "tools.convert --prompt_variant"})
    infer_flags: str = field(default="--backend hf", metadata={
        "help": "extra flags of tools.vllm_infer, one string (e.g. '--backend vllm --max_new_tokens 16')"})
    convert_flags: str = field(default="", metadata={
        "help": "flags of tools.convert for every fold's conversion, one string, as the real training data's (e.g. "
                "'--augment 1 --dialogue_image_max_pixels 175616 --info_file info.jsonl'): the held-out fold gets "
                "the same caps and screenshot text but never --augment/--augment_mask_ratio/--seed; its inference "
                "gets the caps as --task_image_max_pixels"})
    corrections_file: str | None = field(default=None, metadata={
        "help": "a corrections file (as tools.convert's): its accepted labels replace the gold labels before the "
                "split, so folds train on and suspects are checked against the corrected labels"})

    def __post_init__(self):
        if self.folds < 2:
            raise MireInputError(f"--folds: expected at least 2, got {self.folds}")
        if not 0 < self.min_agreement <= 1:
            raise MireInputError(f"--min_agreement: expected a share in (0, 1], got {self.min_agreement}")
        if len(set(self.seeds)) != len(self.seeds) or not self.seeds:
            raise MireInputError(f"--seeds: expected distinct seeds, got {self.seeds}")
        bad = [o for o in self.train_overrides if "=" not in o]
        if bad:
            raise MireInputError(f"--train_overrides: expected key=value, got {bad[0]!r}")
        self._convert = parse_convert_flags(self.convert_flags)
        variant_with_info(self.prompt_variant, self._convert.get("info_file"))  # as each fold's conversion will

    def convert_argv(self, heldout: bool) -> list[str]:
        """--convert_flags as tools.convert flags for a fold's train file, or (without the train-only ones) for its
        held-out fold."""
        return [token for name, value in self._convert.items() if not (heldout and name in TRAIN_ONLY_CONVERT_FLAGS)
                for token in (f"--{name}", str(value))]

    def task_caps(self) -> str:
        """The per-task pixel caps of --convert_flags, as tools.vllm_infer --task_image_max_pixels takes them."""
        return format_caps({"image": self._convert.get("scene_image_max_pixels"),
                            "dialogue": self._convert.get("dialogue_image_max_pixels")})


def parse_convert_flags(text: str) -> dict:
    """--convert_flags checked by tools.convert's own parser (its flags, types, choices and checks), before any fold
    runs: the fields it sets ({name: value}); a flag kfold sets itself, or a file that is not there, refused."""
    try:
        argv = shlex.split(text)
    except ValueError as exc:
        raise MireInputError(f"--convert_flags: {exc} in {text!r}") from None
    if not argv:
        return {}
    from .convert_args import ConvertArguments
    from .hparams import given_flags, parse_args

    if "-h" in argv or "--help" in argv:
        raise MireInputError("--convert_flags: --help is no conversion flag (python -m tools.convert --help lists "
                             "them)")
    given = given_flags(ConvertArguments, argv)
    for name, why in KFOLD_CONVERT_FLAGS.items():
        if name in given:
            raise MireInputError(f"--convert_flags: --{name} is set by tools.kfold ({why}); leave it out")
    try:
        parse_args(ConvertArguments, [*argv, "--input_file", "-", "--image_dir", "-", "--output_dir", "-"])
    except MireInputError as exc:
        message = " ".join(exc.lines).replace("(--help lists the flags)",
                                              "(python -m tools.convert --help lists them)")
        raise MireInputError(f"--convert_flags: {message}") from None
    for name in PATH_CONVERT_FLAGS:
        if given.get(name) is not None:
            path = Path(given[name]).resolve()
            if not path.is_file():
                raise MireInputError(problem(path, None, None, f"not found (--convert_flags --{name})"))
            given[name] = str(path)
    return given


def assign_folds(records: list[MireRecord], k: int, seed: int) -> dict[str, int]:
    """Record id -> fold, stratified by (task, label): each class is shuffled and dealt round-robin, each class
    starting where the last one stopped, so fold sizes differ by at most one and every class spreads evenly."""
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in records:
        groups[(r.task, r.output or "")].append(r.id)
    rng = random.Random(seed)
    out, position = {}, 0
    for key in sorted(groups):
        ids = groups[key]
        rng.shuffle(ids)
        for rid in ids:
            out[rid] = position % k
            position += 1
    return out


def _load_folds(args: KFoldArgs, records: list[MireRecord], out: Path, corrected: dict[str, str]) -> dict[str, int]:
    """The saved split, or a new one. The fold data's conversion flags and label corrections are saved with it: a
    rerun with others would mix folds converted two ways (a folds.json without them had neither)."""
    path = out / "folds.json"
    ids = {r.id for r in records}
    data = {"convert_flags": args.convert_argv(heldout=False), "corrected_labels": corrected}
    if path.is_file():
        saved = read_json(path)
        same = (isinstance(saved, dict) and saved.get("folds") == args.folds and saved.get("split_seed") ==
                args.split_seed and set(saved.get("assignment", {})) == ids)
        if not same:
            raise MireInputError(problem(path, None, None, "holds the folds of another input, --folds or "
                                         "--split_seed; resume with those, or use a new --output_dir"))
        for key, flag in (("convert_flags", "--convert_flags"), ("corrected_labels", "--corrections_file")):
            if saved.get(key, type(data[key])()) != data[key]:
                raise MireInputError(problem(path, None, key, f"the folds were converted with another {flag} "
                                             f"({saved.get(key)!r}); resume with it, or use a new --output_dir"))
        return saved["assignment"]
    assignment = assign_folds(records, args.folds, args.split_seed)
    write_json_atomic(path, {"input_file": str(args.input_file), "folds": args.folds, "split_seed": args.split_seed,
                             **data, "assignment": assignment})
    return assignment


def _run(cmd: list[str], log: Path, what: str) -> None:
    env = {**os.environ}
    env.setdefault("DISABLE_VERSION_CHECK", "1")
    with open(log, "w", encoding="utf-8") as fh:
        code = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    if code != 0:
        last = [line for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        raise MireInputError(f"{what} failed with exit code {code} ({last[-1].strip() if last else 'no output'}"
                             f"); its whole output: {log}")


def train_command(args: KFoldArgs, data: Path, model_dir: Path, seed: int) -> list[str]:
    launcher = ([str(Path(sys.executable).with_name("llamafactory-cli")), "train"] if args.launcher == LAUNCHERS[0]
                else [sys.executable, "-m", "mire_factory.train"])
    return [*launcher, str(Path(args.recipe).resolve()), f"model_name_or_path={args.model_name_or_path}",
            f"dataset_dir={data}", "dataset=mire_train", f"output_dir={model_dir}", f"seed={seed}",
            *FIXED_OVERRIDES, *args.train_overrides]


def _prepare_fold(args: KFoldArgs, raw: dict[str, dict], assignment: dict[str, int], k: int, fold_dir: Path) -> Path:
    train = [raw[i] for i in raw if assignment[i] != k]
    heldout = [{key: v for key, v in raw[i].items() if key != "output"} for i in raw if assignment[i] == k]
    write_json_atomic(fold_dir / "train.json", train)
    write_json_atomic(fold_dir / "heldout.json", heldout)
    data = fold_dir / "data"
    tool = [sys.executable, "-m", "tools.convert", "--image_dir", str(Path(args.image_dir).resolve()),
            "--output_dir", str(data), "--prompt_variant", args.prompt_variant, "--quick"]
    _run([*tool, *args.convert_argv(heldout=False), "--input_file", str(fold_dir / "train.json"), "--val_size", "0"],
         fold_dir / "convert.log", f"tools.convert of fold {k}")
    _run([*tool, *args.convert_argv(heldout=True), "--input_file", str(fold_dir / "heldout.json"), "--kind", "test"],
         fold_dir / "convert_test.log", f"tools.convert of held-out fold {k}")
    return data


def run_kfold(args: KFoldArgs) -> dict:
    from tqdm import tqdm

    out = Path(args.output_dir).resolve()
    mire = read_mire_file(args.input_file, args.image_dir, kind="train", decode_images=False)
    records = mire.records
    raw = {item["id"]: item for item in read_json(args.input_file)}
    corrected: dict[str, str] = {}
    if args.corrections_file is not None:  # the corrected labels are the gold of the folds and of the check
        records, applied = apply_corrections(records, read_corrections(args.corrections_file), args.corrections_file)
        corrected = {c.id: c.label for c in applied.accepted}
        raw = {r.id: {**raw[r.id], "output": r.output} if r.id in corrected else raw[r.id] for r in records}
    with output_lock(out / "kfold", what="another tools.kfold is writing this folder"):
        assignment = _load_folds(args, records, out, corrected)
        jobs = [(k, s) for k in range(args.folds) for s in args.seeds]
        done = [j for j in jobs if (out / f"fold_{j[0]}" / f"seed_{j[1]}" / "done.json").is_file()]
        if done:
            print(f"resuming: {len(done)} of {len(jobs)} (fold, seed) runs already predicted, skipped", flush=True)
        prepared: dict[int, Path] = {}
        bar = tqdm(jobs, desc="folds", unit="run", initial=0)
        for k, seed in bar:
            run_dir = out / f"fold_{k}" / f"seed_{seed}"
            if (k, seed) in done:
                continue
            run_dir.mkdir(parents=True, exist_ok=True)
            if k not in prepared:
                bar.set_postfix_str(f"fold {k}: convert")
                prepared[k] = _prepare_fold(args, raw, assignment, k, out / f"fold_{k}")
            bar.set_postfix_str(f"fold {k} seed {seed}: train")
            _run(train_command(args, prepared[k], run_dir / "model", seed), run_dir / "train.log",
                 f"training fold {k} seed {seed}")
            bar.set_postfix_str(f"fold {k} seed {seed}: predict")
            preds = run_dir / "predictions.jsonl"
            _run([sys.executable, "-m", "tools.vllm_infer", "--model_name_or_path", str(run_dir / "model"),
                  "--dataset", "mire_test", "--dataset_dir", str(prepared[k]), "--save_name", str(preds),
                  "--overwrite", "--task_image_max_pixels", args.task_caps(), *shlex.split(args.infer_flags)],
                 run_dir / "infer.log",
                 f"tools.vllm_infer of fold {k} seed {seed}")
            held = [r for r in records if assignment[r.id] == k]
            load_answers(held, preds)  # complete and paired by id, or an error naming the file, before it counts
            write_json_atomic(run_dir / "done.json", {"fold": k, "seed": seed, "records": len(held)})
        bar.close()
        return collect(args, records, assignment, out)


def collect(args: KFoldArgs, records: list[MireRecord], assignment: dict[str, int], out: Path) -> dict:
    """oof_predictions.jsonl, suspects.jsonl, review.html and summary.json from every (fold, seed) run."""
    by_fold: dict[int, list[MireRecord]] = defaultdict(list)
    for r in records:
        by_fold[assignment[r.id]].append(r)
    rows, per_record = [], defaultdict(list)
    for k in range(args.folds):
        for seed in args.seeds:
            preds = out / f"fold_{k}" / f"seed_{seed}" / "predictions.jsonl"
            answers, _, _ = load_answers(by_fold[k], preds)
            for r, a in zip(by_fold[k], answers, strict=True):
                row = {"id": r.id, "fold": k, "seed": seed, "gold": r.output, "predicted": a.label, "raw": a.text}
                rows.append(row)
                per_record[r.id].append(row)
    suspects = []
    for r in records:
        preds = per_record[r.id]
        wrong = Counter(p["predicted"] for p in preds if p["predicted"] not in (None, r.output))
        if not wrong:
            continue
        label, n = wrong.most_common(1)[0]
        if n / len(args.seeds) >= args.min_agreement:
            evidence = [{"fold": p["fold"], "seed": p["seed"], "predicted": p["predicted"], "raw": p["raw"]}
                        for p in preds]
            suspects.append(Correction(id=r.id, status="suspected", gold=r.output, label=label, by="tools.kfold",
                                       why=f"out-of-fold prediction {label} in {n} of {len(args.seeds)} seeds",
                                       source="kfold", evidence=evidence))
    accuracy = {str(s): sum(p["predicted"] == p["gold"] for p in rows if p["seed"] == s) / len(records)
                for s in args.seeds}
    summary = {"records": len(records), "folds": args.folds, "seeds": args.seeds, "oof_accuracy": accuracy,
               "suspects": len(suspects)}
    with OutputSet() as outs:
        outs.write_jsonl(out / "oof_predictions.jsonl", rows)
        write_corrections(outs, out / "suspects.jsonl", suspects)
        outs.write_text(out / "review.html", review_html(suspects, {r.id: r for r in records}, args.image_dir,
                                                         "Suspected label errors (out-of-fold predictions)"))
        outs.write_json(out / "summary.json", summary)
    return summary
