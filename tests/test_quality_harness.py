"""benchmarks/quality: the TF-IDF anchor and the harness's stages, end to end on a tiny random model (the real run
uses the real-0.5b preset on a GPU: benchmarks/quality/README.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, call_main
from mire_factory.image_info import InfoRecord, file_sha256
from mire_factory.synthetic import make_records, write_dataset

HARNESS = REPO / "benchmarks" / "quality" / "run.py"


def script(path, *args, timeout: int = 900):
    return subprocess.run([sys.executable, str(path), *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def anchor(*args):
    """benchmarks/quality/tfidf_anchor.py's main as its script runs it (run_cli), in this process."""
    from benchmarks.quality.tfidf_anchor import main

    return call_main(main, *args)


def refused_before_any_stage(split, tmp_path, *flags):
    """benchmarks/quality/run.py's main on the split with these flags added: it must exit 2 before any stage."""
    from benchmarks.quality.run import main

    proc = call_main(main, "--train_file", split / "train.json", "--test_file", split / "test.json", "--image_dir",
                     split / "images", "--out", "t", "--workdir", tmp_path / "w", "--device", "cpu", *flags)
    assert not (tmp_path / "w").exists()
    return proc


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """A labelled train and test file sharing one image folder, and an info file with each image's 'screenshot
    text': its record's label, so that the image task is learnable from text alone."""
    root = tmp_path_factory.mktemp("quality")
    train = make_records(40, 46, root / "images", seed=1)
    test = make_records(16, 23, root / "images", seed=2, id_prefix="test")
    write_dataset(root / "train.json", train)
    write_dataset(root / "test.json", test)
    lines = [InfoRecord(name, file_sha256(root / "images" / name), "ocr", "test", "ok",
                        text=f"页面标题 {r['output']}").to_json() for r in train + test for name in r["image"]]
    (root / "info.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def test_user_turns_keeps_the_customer_only():
    from benchmarks.quality.tfidf_anchor import dialogue_text, user_turns
    from mire_factory.taxonomy import build_dialogue_instruction

    instruction = build_dialogue_instruction([("用户", "<image>"), ("客服", "请问有什么可以帮您"),
                                              ("用户", "这个会生锈吗\n用了一个月"), ("客服", "不会的亲")])
    assert user_turns(instruction) == "<image>\n这个会生锈吗\n用了一个月"
    assert dialogue_text(instruction).startswith("用户: <image>\n客服: 请问有什么可以帮您")


def test_anchor_scores_both_tasks_with_screenshot_text(split, tmp_path):
    out = tmp_path / "anchor.json"
    proc = anchor("--train_file", split / "train.json", "--test_file", split / "test.json",
                  "--info_file", split / "info.jsonl", "--json_file", out)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text(encoding="utf-8"))
    # synthetic dialogues carry class phrases in the customer's turns; the info text names the scene
    assert result["dialogue"]["f1"] > 0.8 and result["dialogue"]["view"] == "user_turns"
    assert result["image"]["f1"] > 0.9 and result["image"]["test"] == 16
    proc = anchor("--train_file", split / "train.json", "--test_file", split / "test.json")
    assert proc.returncode == 0 and "image          unavailable" in proc.stdout


def test_anchor_bad_info_file_is_one_line(split, tmp_path):
    bad = tmp_path / "info.jsonl"
    ok = InfoRecord("a.png", "0" * 64, "ocr", "test", "ok", text="ok").to_json()
    bad.write_text(ok + "\n" + ok.replace('"a.png"', '"b.png"').replace('"text": "ok"', '"text": 3') + "\n",
                   encoding="utf-8")
    proc = anchor("--train_file", split / "train.json", "--test_file", split / "test.json",
                  "--info_file", bad)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {bad}: line 2: image 'b.png': field 'text': expected a string or null, got int"]


def test_screenshot_text_hook(split, tmp_path):
    """The OCR stage runs only with --info_file and a tools.convert that offers the variant's flag; its data go
    through tools.convert with the hook's arguments, the labelled test split beside them for the F1 callback."""
    from benchmarks.quality.run import OCR_CONVERT_ARGS, Plan, convert_data, data_ready, ocr_available

    def plan(info, args):
        return Plan(train_file=split / "train.json", test_file=split / "test.json", image_dir=split / "images",
                    test_image_dir=split / "images", seeds=[0], name="t", work=tmp_path, model_dir=tmp_path / "m",
                    gguf=None, info_file=info, ocr_convert_args=args, device="cpu", smoke=False)

    assert ocr_available(plan(None, "--format sharegpt")) == "no --info_file (screenshot text per image)"
    assert ocr_available(plan(split / "info.jsonl", "--no_such_flag {info_file}")) == (
        "tools.convert has no --no_such_flag yet (the extraction issue's prompt variant)")
    wired = plan(split / "info.jsonl", OCR_CONVERT_ARGS)  # the variant's real flags (tools.convert has them)
    assert ocr_available(wired) is None
    convert_data(wired, tmp_path / "data_ocr", tmp_path / "eval_ocr",
                 OCR_CONVERT_ARGS.format(info_file=split / "info.jsonl").split(), "_ocr")
    assert data_ready(tmp_path / "data_ocr")
    rows = json.loads((tmp_path / "eval_ocr" / "mire_train.json").read_text(encoding="utf-8"))
    assert len(rows) == 39 and all(r["messages"][1]["content"] for r in rows)  # the labelled test split
    # the screenshot text is in the prompts of both, after the instruction
    train = json.loads((tmp_path / "data_ocr" / "mire_train.json").read_text(encoding="utf-8"))
    for row in train + rows:
        assert ("\n图片中的文字：\n" in row["messages"][0]["content"]) == bool(row["images"])
    assert any("页面标题" in row["messages"][0]["content"] for row in rows)
    # its image paths, written relative to eval_ocr, resolve from data_ocr (LLaMA-Factory's media_dir)
    assert all((tmp_path / "data_ocr" / image).is_file() for r in rows for image in r["images"])


@pytest.mark.parametrize(("spec", "message"), [
    ("augment", 'expected NAME="TOOLS.CONVERT ARGS", e.g. augment="--augment 1"'),
    ("Aug-1=--augment 1", "the name 'Aug-1' must be a lower-case identifier (a-z, 0-9, _; a letter first; at most 32)"),
    ("ocr=--augment 1", "the name 'ocr' is the harness's own; choose another"),
    ("a=", "no tools.convert arguments, --variant_reasons or --variant_epochs (the plain data is the fine_tuned row "
           "already)"),
    ("a=--aug 1", "tools.convert has no flag --aug (give flags in full; python -m tools.convert --help lists them)"),
    ("a=--augment x", "tools.convert refuses it: argument --augment: invalid int value: 'x'"),
    ("a=--dialogue_image_max_pixels 100", "tools.convert refuses it: --dialogue_image_max_pixels must be at least "
                                          "3136 pixels (56x56, Qwen2-VL's smallest image), got 100"),
    ("a=--val_size 0.2", "--val_size is set by the harness for each conversion; leave it out"),
    ("a=--info_file {info_file}", "{info_file} needs --info_file"),
])
def test_bad_variant_is_one_line(split, tmp_path, spec, message):
    proc = refused_before_any_stage(split, tmp_path, "--variant", "ok=--augment 1", "--variant", spec)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: --variant {spec!r}: {message}"]


def test_variant_name_given_twice_is_one_line(split, tmp_path):
    proc = refused_before_any_stage(split, tmp_path, "--variant", "aug=--augment 1", "--variant", "aug=--augment 2")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --variant: the name 'aug' is given twice"]


def test_variant_test_conversions_leave_train_only_flags_out():
    from benchmarks.quality.run import parse_variant

    v = parse_variant("both=--augment=2 --augment-mask-ratio 0.2 --dialogue_image_max_pixels 175616", None)
    assert v.train_args == ["--augment=2", "--augment-mask-ratio", "0.2", "--dialogue_image_max_pixels", "175616"]
    assert v.test_args == ["--dialogue_image_max_pixels", "175616"]  # tools.convert refuses --augment on a test file
    assert parse_variant("augment=--augment 1", None).test_args == []
    # a corrections file names train records: the test files keep their ids and gold labels as given
    fixed = parse_variant("fixed=--corrections_file c.jsonl --dialogue_image_max_pixels 175616", None)
    assert fixed.test_args == ["--dialogue_image_max_pixels", "175616"]


@pytest.mark.slow
def test_harness_smoke_every_stage_then_resumes(split, tiny_model_dir, tmp_path):
    """--smoke with the tiny model: every stage runs through the project's tools for two seeds, the plain data and
    a --variant (augmented copies, dialogue images capped), then the report and the plot; a rerun skips every
    stage, a lost output reruns its stage alone, and the variant under other arguments is refused."""
    from mire_factory.augment import AUGMENT_KEY
    from mire_factory.dataset_info import TASK_MAX_PIXELS_KEY

    work, results = tmp_path / "work", tmp_path / "results"
    aug_cap = "aug_cap=--augment 1 --dialogue_image_max_pixels 3136"
    args = [HARNESS, "--train_file", split / "train.json", "--test_file", split / "test.json", "--image_dir",
            split / "images", "--seeds", 0, 1, "--out", "t", "--smoke", "--model_dir", tiny_model_dir,
            "--workdir", work, "--results_dir", results, "--device", "cpu", "--parallel", 2, "--variant", aug_cap,
            "--variant", "plain2=", "--variant_epochs", "plain2=2"]  # the label runs' data, twice the steps
    # --prepare_only: every stage before the runs, then stop (the GPU stays free for another job)
    proc = script(*args, "--prepare_only")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "the same command without it trains the 6 runs" in proc.stdout
    # the two data folders are tokenized side by side (--parallel 2): both start before either ends
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[tokenize_")]
    assert sorted(lines[:2]) == ["[tokenize_aug_cap] ...", "[tokenize_label] ..."], lines
    prepared = json.loads((work / "timings.json").read_text(encoding="utf-8"))
    assert {"data", "untrained", "tokenize_label", "tokenize_aug_cap"} <= set(prepared)  # the model is given
    assert not {"data_plain2", "tokenize_plain2"} & set(prepared)  # plain2 trains the label runs' data
    assert not (work / "data_plain2").exists()
    assert not any(k.startswith(("train_", "infer_label", "infer_aug")) for k in prepared), prepared
    assert not (results / "t.json").exists() and not (work / "label_s0").exists()
    proc = script(*args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((results / "t.json").read_text(encoding="utf-8"))
    assert prepared.items() <= result["timings_s"].items()  # nothing prepared was done again
    for key in ("untrained", "fine_tuned"):
        for task in ("image", "dialogue", "overall"):
            assert 0 <= result[key][task]["mean"] <= 1, (key, task)
    assert set(result["fine_tuned"]["dialogue"]["per_seed"]) == {"0", "1"}
    assert result["fine_tuned_ocr"] == {"not_run": "no --info_file (screenshot text per image)"}
    assert result["tfidf_anchor"]["image"] == {"unavailable": "no --info_file with screenshot text (the instruction "
                                                              "is the same for every image record)"}
    assert set(result["tfidf_anchor"]["dialogue"]["per_seed"]) == {"0", "1"}
    assert result["targets"] == {}  # a smoke run's scores measure nothing
    for seed in ("0", "1"):
        assert [p["step"] for p in result["eval_f1_curves"][f"seed {seed}"]] == [2]
        assert [p["step"] for p in result["loss_curves"][f"seed {seed}"]] == [1, 2]  # logging_steps 1
        assert all(p["loss"] > 0 for p in result["loss_curves"][f"seed {seed}"])
        assert result["callback_vs_tools"][seed]["records"] == 8
    assert (results / "t_eval_f1.png").stat().st_size > 10_000
    assert {"untrained", "tokenize_label", "train_label_s1", "infer_label_s1"} <= set(result["timings_s"])
    for seed in (0, 1):  # each data variant tokenized once (its stage), every run loaded it
        for variant, data in (("label", "data"), ("aug_cap", "data_aug_cap"), ("plain2", "data")):
            log = (work / "logs" / f"train_{variant}_s{seed}.log").read_text(encoding="utf-8")
            assert f"Loaded tokenized dataset from {work / data / 'tokenized'}" in log, (variant, seed)
            assert "training logits: at label positions only" in log, (variant, seed)  # the harness's recipe

    # the variant: its own data (train split with one augmented copy each, every split's dialogue images capped;
    # the test and evaluation splits without copies), trained and inferred per seed, reported against fine_tuned
    data = work / "data_aug_cap"
    info = json.loads((data / "dataset_info.json").read_text(encoding="utf-8"))
    assert len(json.loads((data / "mire_train.json").read_text(encoding="utf-8"))) == 32  # 16 records + 16 copies
    assert info["mire_train"][AUGMENT_KEY]["rows"] == 16
    for name in ("mire_train", "mire_test", "mire_quality_eval"):
        assert info[name][TASK_MAX_PIXELS_KEY] == {"image": None, "dialogue": 3136}, name
        assert AUGMENT_KEY not in info[name] or name == "mire_train"
    evald = json.loads((work / "eval_aug_cap" / "mire_train.json").read_text(encoding="utf-8"))
    assert len(evald) == 8  # the labelled test split, without copies
    assert all((data / image).is_file() for row in evald for image in row["images"])  # resolve from data_aug_cap
    part = result["variants"]["aug_cap"]
    assert part["convert_args"] == "--augment 1 --dialogue_image_max_pixels 3136"
    assert part["test_convert_args"] == "--dialogue_image_max_pixels 3136" and part["train_rows"] == 32
    for task in ("image", "dialogue", "overall"):
        assert set(part[task]["per_seed"]) == {"0", "1"} and 0 <= part[task]["mean"] <= 1, task
        assert part["vs_fine_tuned"][task]["mean"] == round(part[task]["mean"] - result["fine_tuned"][task]["mean"],
                                                            4)
    for seed in (0, 1):
        assert (work / f"aug_cap_s{seed}" / "infer" / "predictions.jsonl").is_file()
    assert {"data_aug_cap", "tokenize_aug_cap", "train_aug_cap_s0", "infer_aug_cap_s1"} <= set(result["timings_s"])
    assert [p["step"] for p in result["eval_f1_curves"]["seed 1, aug_cap"]] == [2]
    assert list(result["loss_curves"]) == list(result["eval_f1_curves"])
    assert "variant aug_cap" in proc.stdout and "minus fine_tuned" in proc.stdout
    plain = result["variants"]["plain2"]
    assert (plain["convert_args"], plain["epochs"], plain["train_rows"]) == ("", 2.0, 16)
    assert set(plain["overall"]["per_seed"]) == {"0", "1"}

    proc = script(*args)
    assert proc.returncode == 0 and proc.stdout.count("done earlier") == 20, proc.stdout
    assert "[tokenize_label] done earlier" in proc.stdout and "[tokenize_aug_cap] done earlier" in proc.stdout
    (work / "label_s1" / "infer" / "metrics.json").unlink()
    proc = script(*args)
    assert proc.returncode == 0 and proc.stdout.count("done earlier") == 19, proc.stdout
    assert "[infer_label_s1] ..." in proc.stdout
    proc = script(*[("aug_cap=--augment 2" if a == aug_cap else a) for a in args])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {work}: --variant aug_cap: this work folder converted it with '--augment 1 "
        "--dialogue_image_max_pixels 3136', not '--augment 2'; use another name or --workdir"]


@pytest.mark.parametrize(("spec", "message"), [
    ("nope=r.jsonl", "--variant_reasons 'nope=r.jsonl': no --variant named 'nope'"),
    ("reason", "--variant_reasons 'reason': expected NAME=REASONS_JSONL"),
    ("reason=", "--variant_reasons 'reason=': expected NAME=REASONS_JSONL"),
    ("reason=absent.jsonl", "{cwd}/absent.jsonl: --variant_reasons reason: file not found"),
    ("reason=bad.jsonl", "{cwd}/bad.jsonl: line 1: not valid JSON (Expecting property name enclosed in double quotes)"),
])
def test_bad_variant_reasons_is_one_line(split, tmp_path, spec, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.jsonl").write_text("{oops\n", encoding="utf-8")
    proc = refused_before_any_stage(split, tmp_path, "--variant", "reason=", "--variant_reasons", spec)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {message.format(cwd=tmp_path)}"]


def test_reasons_variant_trains_on_a_second_turn_and_tests_plain(split, tmp_path):
    """--variant reason="" --variant_reasons reason=R: the stand-in teacher's reasons (definition_reasons.py) merged
    as a second exchange into the variant's train file only; a rerun with other reasons under the name is refused."""
    from benchmarks.quality.definition_reasons import main as reasons_main
    from benchmarks.quality.run import (
        VARIANT_SPEC,
        Plan,
        Recipe,
        check_variant_specs,
        convert_variant,
        parse_variant,
        set_variant_reasons,
        train_rows,
        variant_ready,
    )
    from mire_factory.prompts import REASON_QUESTION
    from mire_factory.reasons import load_reasons

    reasons = tmp_path / "reasons.jsonl"
    assert call_main(reasons_main, "--train_file", split / "train.json", "--out", reasons).returncode == 0
    rows = load_reasons(reasons)
    gold = {r["id"]: r["output"] for r in json.loads((split / "train.json").read_text(encoding="utf-8"))}
    assert {r.id: r.label for r in rows} == gold and all(r.status == "ok" and r.reason for r in rows)
    dialogue = [r for r in rows if r.task == "dialogue"]
    assert dialogue and all(r.reason.startswith(("用户说“", "用户发来图片")) for r in dialogue)

    v = parse_variant("reason=", None)
    set_variant_reasons([v], f"reason={reasons}")
    plan = Plan(train_file=split / "train.json", test_file=split / "test.json", image_dir=split / "images",
                test_image_dir=split / "images", seeds=[0], name="t", work=tmp_path / "w", model_dir=tmp_path / "m",
                gguf=None, info_file=None, ocr_convert_args="", device="cpu", smoke=False, recipe=Recipe(),
                variants=[v])
    (tmp_path / "w").mkdir()
    convert_variant(plan, v)
    data = v.data(plan.work)
    assert variant_ready(plan, v)
    info = json.loads((data / "dataset_info.json").read_text(encoding="utf-8"))
    assert info["mire_train"]["file_name"] == "mire_train_reason.json"
    train = json.loads((data / "mire_train_reason.json").read_text(encoding="utf-8"))
    assert train_rows(data) == len(train) == len(gold)
    for row in train:
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["user", "assistant", "user", "assistant"] and row["messages"][2]["content"] == REASON_QUESTION
        assert row["messages"][1]["content"] in gold.values()  # the first answer is the bare label
    for name in ("mire_test", "mire_quality_eval"):
        test = json.loads((data / info[name]["file_name"]).read_text(encoding="utf-8"))
        assert test and all(len(row["messages"]) == 2 for row in test), name
    assert json.loads((data / VARIANT_SPEC).read_text(encoding="utf-8"))["reasons"] == "reasons.jsonl"

    other = tmp_path / "other.jsonl"
    other.write_bytes(reasons.read_bytes())
    v2 = parse_variant("reason=", None)
    set_variant_reasons([v2], f"reason={other}")
    with pytest.raises(Exception, match="merged reasons 'reasons.jsonl' into it, not 'other.jsonl'"):
        check_variant_specs(Plan(**{**plan.__dict__, "variants": [v2]}))


@pytest.mark.parametrize(("spec", "message"), [
    ("nope=6", "no --variant named 'nope'"),
    ("plain6=0", "expected NAME=EPOCHS with EPOCHS a number above 0"),
    ("plain6=six", "expected NAME=EPOCHS with EPOCHS a number above 0"),
    ("plain6=nan", "expected NAME=EPOCHS with EPOCHS a number above 0"),
    ("plain6", "expected NAME=EPOCHS with EPOCHS a number above 0"),
])
def test_bad_variant_epochs_is_one_line(split, tmp_path, spec, message):
    proc = refused_before_any_stage(split, tmp_path, "--variant", "plain6=--augment 0", "--variant_epochs", spec)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: --variant_epochs {spec!r}: {message}"]


def test_variant_epochs_reach_its_runs_and_a_run_of_other_steps_trains_anew(split, tmp_path):
    """The equal-steps control for --augment 1 (twice the rows): the plain data, twice the epochs. Only that
    variant's runs change; a finished run is reused only when it trained the epochs asked for now."""
    from benchmarks.quality.run import (
        RUN_SPEC,
        Plan,
        Recipe,
        parse_variant,
        run_dir,
        run_epochs,
        set_variant_epochs,
        tokenize_spec,
        train_overrides,
        train_steps,
        trained_as_planned,
    )

    variants = [parse_variant("plain6=--augment 0", None), parse_variant("augment=--augment 1", None)]
    set_variant_epochs(variants, "plain6=6")
    plan = Plan(train_file=split / "train.json", test_file=split / "test.json", image_dir=split / "images",
                test_image_dir=split / "images", seeds=[0], name="t", work=tmp_path / "w", model_dir=tmp_path / "m",
                gguf=None, info_file=None, ocr_convert_args="", device="cuda", smoke=False,
                recipe=Recipe(batch_size=2, grad_accum=4, epochs=3.0, evals=1), variants=variants)
    data = tmp_path / "data"
    data.mkdir()
    (data / "mire_train.json").write_text(json.dumps([{}] * 86), encoding="utf-8")  # 86 rows: 11 steps an epoch

    def overrides(variant):
        return dict(o.split("=", 1) for o in train_overrides(plan, data, tmp_path / "o", 0,
                                                             epochs=run_epochs(plan, variant)))

    assert [run_epochs(plan, v) for v in ("label", "augment", "plain6")] == [3.0, 3.0, 6.0]
    assert (overrides("label")["num_train_epochs"], overrides("label")["eval_steps"]) == ("3.0", "33")
    assert (overrides("plain6")["num_train_epochs"], overrides("plain6")["eval_steps"]) == ("6.0", "66")
    assert train_steps(plan, 86, 6.0) == 2 * train_steps(plan, 86) == 66
    assert tokenize_spec(plan, data) == [o for o in tokenize_spec(plan, data)
                                         if not o.startswith(("num_train_epochs=", "eval_steps="))]

    ft = run_dir(plan, "plain6", 0) / "ft"
    ft.mkdir(parents=True)
    for name in ("config.json", "trainer_state.json", "model.safetensors"):
        (ft / name).write_text("{}")
    assert not trained_as_planned(plan, "plain6", 0)  # no record of its epochs: trained anew
    (ft.parent / RUN_SPEC).write_text(json.dumps({"epochs": 3.0}))
    assert not trained_as_planned(plan, "plain6", 0)  # trained for 3 epochs, 6 asked for now
    (ft.parent / RUN_SPEC).write_text(json.dumps({"epochs": 6.0}))
    assert trained_as_planned(plan, "plain6", 0)


@pytest.mark.slow
def test_each_data_variant_is_tokenized_once_and_its_runs_load_it(split, tiny_model_dir, tmp_path):
    """The tokenize stage saves a data folder's train and evaluation datasets once (LLaMA-Factory's get_dataset on
    the runs' own arguments); two seeds' real tiny trainings load them (LLaMA-Factory's own log line), tokenize
    nothing themselves, and the F1 callback still evaluates every record. Done-marker: the saved dataset made with
    the runs' current overrides."""
    from benchmarks.quality.run import (
        Plan,
        Recipe,
        convert_data,
        run_dir,
        smoke_files,
        stage,
        tokenize,
        tokenized,
        tokenized_dir,
        train,
    )

    recipe = Recipe(batch_size=2, eval_batch_size=4, evals=1, max_new_tokens=16, image_max_pixels=224 * 224)
    work = tmp_path / "work"
    plan = Plan(train_file=split / "train.json", test_file=split / "test.json", image_dir=split / "images",
                test_image_dir=split / "images", seeds=[0, 1], name="t", work=work, model_dir=tiny_model_dir,
                gguf=None, info_file=None, ocr_convert_args="", device="cpu", smoke=True, recipe=recipe)
    smoke_files(plan)
    data = work / "data"
    convert_data(plan, data, work / "eval", [], "")
    assert not tokenized(plan, data)
    stage(plan, "tokenize_label", tokenized(plan, data), tokenize, plan, data, "label")
    saved = tokenized_dir(data)
    assert tokenized(plan, data) and sorted(p.name for p in saved.iterdir() if p.is_dir()) == ["train", "validation"]
    assert not (data / "tokenized.partial").exists() and not (work / "tokenize_label").exists()
    assert "tokenize_label" in json.loads((work / "timings.json").read_text(encoding="utf-8"))
    made = (saved / "dataset_dict.json").stat().st_mtime_ns

    for seed in plan.seeds:
        train(plan, data, "label", seed)
        log = (work / "logs" / f"train_label_s{seed}.log").read_text(encoding="utf-8")
        assert f"Loaded tokenized dataset from {saved}" in log, log[-3000:]
        assert "Running tokenizer on dataset" not in log
        ft = run_dir(plan, "label", seed) / "ft"
        rows = (ft / "f1_eval" / "eval_step2.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(rows) == 8  # the labelled test split, every record evaluated by the F1 callback
        history = json.loads((ft / "trainer_state.json").read_text(encoding="utf-8"))["log_history"]
        assert any("eval_f1" in h and "eval_loss" in h for h in history)
    assert (saved / "dataset_dict.json").stat().st_mtime_ns == made  # loaded, never saved again

    stage(plan, "tokenize_label", tokenized(plan, data), tokenize, plan, data, "label")  # done: skipped
    assert (saved / "dataset_dict.json").stat().st_mtime_ns == made
    plan.recipe.image_max_pixels = 112 * 112  # other overrides than the saved data's: tokenized anew
    assert not tokenized(plan, data)


def _finished_run(root):
    """A finished result (two runs: seed 0 and a variant 'aug'; no screenshot text) and its runs' trainer states,
    written as transformers writes them (json.dump: a NaN loss is the bare token NaN)."""
    result = {"name": "r", "seeds": [0], "untrained": {"dialogue": {"mean": 0.01}, "image": {"mean": 0.02}},
              "fine_tuned": {"dialogue": {"mean": 0.6543, "per_seed": {"0": 0.6543}}},
              "fine_tuned_ocr": {"not_run": "no --info_file (screenshot text per image)"},
              "tfidf_anchor": {"dialogue": {"mean": 0.5}, "image": {"unavailable": "no"}},
              "variants": {"aug": {"dialogue": {"mean": 0.7}}},
              "eval_f1_curves": {"seed 0": [{"step": 4, "eval_f1_dialogue": 0.6, "eval_f1_image": 0.1}],
                                 "seed 0, aug": [{"step": 6, "eval_f1_dialogue": 0.7, "eval_f1_image": 0.2}]},
              "plot": "/elsewhere/r_eval_f1.png"}
    (root / "r.json").write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    histories = {"label_s0": [{"loss": 2.5, "step": 1}, {"loss": float("nan"), "step": 2}, {"loss": 1.0, "step": 4},
                              {"eval_f1": 0.35, "eval_f1_dialogue": 0.6, "eval_loss": 0.4, "step": 4},
                              {"train_loss": 1.7, "step": 4}],
                 "aug_s0": [{"loss": float("inf"), "step": 3}, {"loss": 0.123456, "step": 6}]}
    for run, history in histories.items():
        (root / "runs" / run / "ft").mkdir(parents=True)
        (root / "runs" / run / "ft" / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    return result


def test_replot_adds_loss_curves_and_leaves_every_other_key(tmp_path):
    """--replot: each run's logged losses (not the eval or the train_loss summary entries; a NaN or inf loss as
    null) stored as loss_curves under the result's run names, every other key as it was, and the png redrawn."""
    from PIL import Image

    from benchmarks.quality.run import main

    before = _finished_run(tmp_path)
    proc = call_main(main, "--replot", tmp_path / "r.json", "--runs_dir", tmp_path / "runs")
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "r.json").read_text(encoding="utf-8")
    after = json.loads(text, parse_constant=lambda token: pytest.fail(f"{token} in the JSON"))  # strict JSON
    assert after.pop("loss_curves") == {
        "seed 0": [{"step": 1, "loss": 2.5}, {"step": 2, "loss": None}, {"step": 4, "loss": 1.0}],
        "seed 0, aug": [{"step": 3, "loss": None}, {"step": 6, "loss": 0.1235}]}
    assert after == before and list(after) == list(before)  # F1 figures, plot path, key order: untouched
    with Image.open(tmp_path / "r_eval_f1.png") as image:
        assert image.format == "PNG" and image.width == 1980  # three panels: the loss beside the two F1 ones
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left behind

    proc = call_main(main, "--replot", tmp_path / "r.json", "--runs_dir", tmp_path / "runs")  # again: the same
    assert proc.returncode == 0 and (tmp_path / "r.json").read_text(encoding="utf-8") == text


def test_replot_refusals_are_one_line_and_change_nothing(tmp_path):
    from benchmarks.quality.run import main

    _finished_run(tmp_path)
    text = (tmp_path / "r.json").read_text(encoding="utf-8")
    state = tmp_path / "runs" / "aug_s0" / "ft" / "trainer_state.json"
    state.unlink()
    proc = call_main(main, "--replot", tmp_path / "r.json", "--runs_dir", tmp_path / "runs")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {state}: not found (--runs_dir holds RUN/ft/trainer_state.json per run)"]
    assert (tmp_path / "r.json").read_text(encoding="utf-8") == text and not (tmp_path / "r_eval_f1.png").exists()
    proc = call_main(main, "--replot", tmp_path / "r.json")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].endswith("error: --replot needs --runs_dir")
    (tmp_path / "other.json").write_text('{"name": "x"}', encoding="utf-8")
    proc = call_main(main, "--replot", tmp_path / "other.json", "--runs_dir", tmp_path / "runs")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'other.json'}: field 'eval_f1_curves': missing: not a quality harness result"]
    proc = call_main(main, "--out", "t")  # a run still needs its files
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].endswith(
        "the following arguments are required: --train_file, --test_file, --image_dir")


def test_label_noise_plants_errors_and_scores_suspects(split, tmp_path):
    """label_noise.py: the planted errors kfold is scored against (seeded, same task's labels), and the score."""
    from benchmarks.quality.label_noise import main as noise_main
    from mire_factory.corrections import Correction
    from mire_factory.taxonomy import DIALOGUE_LABELS

    out = tmp_path / "noise"
    args = ("inject", "--train_file", split / "train.json", "--out", out, "--rate", "0.2", "--seed", "3",
            "--only_task")
    assert call_main(noise_main, *args).returncode == 0
    noisy = json.loads((out / "train_noisy.json").read_text(encoding="utf-8"))
    plants = json.loads((out / "plants.json").read_text(encoding="utf-8"))
    gold = {r["id"]: r["output"] for r in json.loads((split / "train.json").read_text(encoding="utf-8"))}
    dialogue_ids = [i for i in gold if "-dlg-" in i]
    assert [r["id"] for r in noisy] == dialogue_ids and len(plants) == round(0.2 * len(dialogue_ids))
    planted = {p["id"]: p["planted"] for p in plants}
    for r in noisy:
        assert r["output"] == planted.get(r["id"], gold[r["id"]])
    assert all(p["gold"] == gold[p["id"]] != p["planted"] and p["planted"] in DIALOGUE_LABELS for p in plants)
    first = (out / "plants.json").read_bytes()
    assert call_main(noise_main, *args).returncode == 0 and (out / "plants.json").read_bytes() == first  # seeded

    ids = list(planted)
    suspects = [Correction(i, "suspected", planted[i], gold[i] if n < 3 else DIALOGUE_LABELS[0], source="kfold")
                for n, i in enumerate(ids[:5])]
    suspects += [Correction(i, "suspected", gold[i], DIALOGUE_LABELS[1], source="kfold")
                 for i in dialogue_ids if i not in planted][:2]
    path = tmp_path / "suspects.jsonl"
    path.write_text("".join(json.dumps(c.to_dict(), ensure_ascii=False) + "\n" for c in suspects), encoding="utf-8")
    proc = call_main(noise_main, "score", "--plants", out / "plants.json", "--suspects", path, "--out",
                     tmp_path / "score.json")
    assert proc.returncode == 0
    score = json.loads((tmp_path / "score.json").read_text(encoding="utf-8"))
    assert (score["plants"], score["suspects"], score["planted_found"]) == (len(plants), 7, 5)
    assert score["recall"] == round(5 / len(plants), 4) and score["precision"] == round(5 / 7, 4)
    assert score["found_proposing_the_original_label"] == 3 and len(score["unplanted_suspects"]) == 2
    assert score["missed"] == sorted(ids[5:])
    path.write_text("", encoding="utf-8")  # tools.kfold found nothing
    assert call_main(noise_main, "score", "--plants", out / "plants.json", "--suspects", path, "--out",
                     tmp_path / "score.json").returncode == 0
    score = json.loads((tmp_path / "score.json").read_text(encoding="utf-8"))
    assert (score["suspects"], score["recall"], score["precision"]) == (0, 0.0, None)
    (tmp_path / "bad.json").write_text("[1]", encoding="utf-8")
    proc = call_main(noise_main, "score", "--plants", tmp_path / "bad.json", "--suspects", path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'bad.json'}: record #0: expected a list of {{id, gold, planted}} (label_noise.py inject "
        "writes it)"]

    proc = call_main(noise_main, "inject", "--train_file", split / "train.json", "--out", tmp_path / "x", "--rate",
                     "1.5")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --rate: expected a share between 0 and 1, got 1.5"]
    assert not (tmp_path / "x").exists()


def test_label_noise_review_writes_corrections_that_tools_convert_applies(split, tmp_path):
    """label_noise.py review: a reviewer's corrections file for the suspects (right proposals accepted, or every
    suspected plant relabelled), which tools.convert applies to the whole noisy train file: the F1 arm of item 5."""
    from benchmarks.quality.label_noise import main as noise_main
    from mire_factory.corrections import Correction, read_corrections
    from mire_factory.taxonomy import DIALOGUE_LABELS

    out = tmp_path / "noise"
    assert call_main(noise_main, "inject", "--train_file", split / "train.json", "--out", out, "--rate", "0.2",
                     "--seed", "3").returncode == 0
    plants = {p["id"]: p for p in json.loads((out / "plants.json").read_text(encoding="utf-8"))}
    gold = {r["id"]: r["output"] for r in json.loads((split / "train.json").read_text(encoding="utf-8"))}
    assert len(json.loads((out / "train_noisy.json").read_text(encoding="utf-8"))) == len(gold)  # every task
    ids, clean = list(plants), [i for i in gold if "-dlg-" in i and i not in plants]
    wrong = [label for label in DIALOGUE_LABELS if label not in {plants[ids[2]]["gold"], plants[ids[2]]["planted"]}]
    suspects = [Correction(i, "suspected", plants[i]["planted"], plants[i]["gold"], source="kfold") for i in ids[:2]]
    suspects += [Correction(ids[2], "suspected", plants[ids[2]]["planted"], wrong[0], source="kfold"),
                 Correction(clean[0], "suspected", gold[clean[0]], wrong[1], source="kfold")]
    path = tmp_path / "suspects.jsonl"
    path.write_text("".join(json.dumps(c.to_dict(), ensure_ascii=False) + "\n" for c in suspects), encoding="utf-8")
    accepted = {}
    for reviewer in ("proposals", "oracle"):
        target = tmp_path / f"{reviewer}.jsonl"
        proc = call_main(noise_main, "review", "--plants", out / "plants.json", "--suspects", path, "--out", target,
                         "--reviewer", reviewer)
        assert proc.returncode == 0
        lines = read_corrections(target)
        assert [c.id for c in lines] == [c.id for c in suspects]
        accepted[reviewer] = {c.id: c.label for c in lines if c.status == "accepted"}
        assert all(c.status == "rejected" for c in lines if c.id not in accepted[reviewer])
    assert accepted["proposals"] == {i: plants[i]["gold"] for i in ids[:2]}
    assert accepted["oracle"] == {i: plants[i]["gold"] for i in ids[:3]}

    proc = subprocess.run([sys.executable, "-m", "tools.convert", "--input_file", out / "train_noisy.json",
                           "--image_dir", split / "images", "--output_dir", tmp_path / "conv", "--corrections_file",
                           tmp_path / "oracle.jsonl", "--val_size", "0"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "3 accepted applied (3 label changes" in proc.stdout
    rows = json.loads((tmp_path / "conv" / "mire_train.json").read_text(encoding="utf-8"))
    assert len(rows) == len(gold)

    path.write_text("", encoding="utf-8")
    proc = call_main(noise_main, "review", "--plants", out / "plants.json", "--suspects", path, "--out",
                     tmp_path / "none.jsonl")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {path}: no suspects to review (empty file)"]
    assert not (tmp_path / "none.jsonl").exists()


def test_runs_out_of_gpu_memory_side_by_side_run_again_fewer_at_a_time(tmp_path, capfd):
    """The ninth quality lease: five 0.5B runs side by side, one ran out of memory and the harness stopped. Now the
    runs that fail with PyTorch's out-of-memory message go again after the others, half as many at a time; any other
    failure, or one at a time, still stops the harness."""
    import threading

    from benchmarks.quality.run import OutOfGpuMemory, Plan, StageFailed, run_logged, side_by_side_retrying_oom

    plan = Plan(train_file=tmp_path / "t.json", test_file=tmp_path / "t.json", image_dir=tmp_path, test_image_dir=tmp_path,
                seeds=[0], name="t", work=tmp_path / "w", model_dir=tmp_path / "m", gguf=None, info_file=None,
                ocr_convert_args="", device="cpu", smoke=False, parallel=4)
    running, peak, lock = [0], [0], threading.Lock()
    # the process prints the message torch.cuda's allocator raises and exits 1 while 3 or more run at once
    crowded = ("import sys; print('torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 7.86 GiB.'); "
               "sys.exit(1)")

    def job(name: str, fails: str) -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            now = running[0]
        try:
            import time
            time.sleep(0.3)  # long enough for the pool's four to overlap
            code = crowded if fails == "oom" and now >= 3 else (
                "raise SystemExit('no such file')" if fails == "other" else "print('trained')")
            run_logged(plan, name, [sys.executable, "-c", code])
        finally:
            with lock:
                running[0] -= 1

    jobs = [(job, f"train_r{i}", "oom" if i in (2, 3) else "none") for i in range(4)]
    side_by_side_retrying_oom(plan, jobs)
    out = capfd.readouterr().out
    assert "[retry] 2 run(s) ran out of GPU memory beside others (train_r2, train_r3): again, 2 at a time" in out
    assert (plan.work / "logs" / "train_r3.log").read_text().strip() == "trained"  # the retry's own log
    assert peak[0] == 4

    # a failure that is not out of memory is raised after the others, as before: no retry
    with pytest.raises(StageFailed, match="train_x: exit code 1") as caught:
        side_by_side_retrying_oom(plan, [(job, "train_x", "other"), (job, "train_y", "none")])
    assert not isinstance(caught.value, OutOfGpuMemory) and "[retry]" not in capfd.readouterr().out

    # one at a time there is nothing to wait for: the out-of-memory failure is raised
    running[0] = 2  # as if two others held the GPU: the job sees 3 running
    with pytest.raises(OutOfGpuMemory, match="train_z: exit code 1"):
        side_by_side_retrying_oom(Plan(**{**plan.__dict__, "parallel": 1}), [(job, "train_z", "oom")])
