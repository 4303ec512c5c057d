"""tools.kfold: folds, out-of-fold predictions through the real llamafactory-cli and tools.vllm_infer, suspects."""

from __future__ import annotations

import json
import sys
from collections import Counter

import pytest

from conftest import run_tool
from mire_factory.corrections import read_corrections
from mire_factory.kfold import KFoldArgs, assign_folds, collect
from mire_factory.records import load_records
from mire_factory.synthetic import make_records, write_dataset

IMAGE_CLASSES = ("商品头图", "支付页面", "退款页面")
DIALOGUE_CLASSES = ("是否好用", "商品材质", "气泡")


@pytest.fixture(scope="module")
def small_train(tmp_path_factory):
    root = tmp_path_factory.mktemp("kfold_data")
    records = make_records(9, 9, root / "images", seed=3, image_classes=IMAGE_CLASSES,
                           dialogue_classes=DIALOGUE_CLASSES, max_dialogue_images=1)
    write_dataset(root / "train.json", records)
    return root / "train.json", root / "images"


def test_folds_partition_and_stratify(synthetic_train):
    records = load_records(*synthetic_train)
    folds = assign_folds(records, 5, seed=7)
    assert set(folds) == {r.id for r in records} and set(folds.values()) == set(range(5))
    sizes = Counter(folds.values())
    assert max(sizes.values()) - min(sizes.values()) <= 1
    for label in {r.output for r in records}:
        spread = Counter(folds[r.id] for r in records if r.output == label)
        assert max(spread.values()) - min(spread.get(k, 0) for k in range(5)) <= 1, label
    assert assign_folds(records, 5, seed=7) == folds != assign_folds(records, 5, seed=8)


@pytest.mark.slow
def test_kfold_cli_trains_predicts_and_lists_suspects(small_train, tiny_model_dir, tmp_path):
    train, images = small_train
    out = tmp_path / "kfold"
    args = ["--input_file", train, "--image_dir", images, "--output_dir", out, "--model_name_or_path", tiny_model_dir,
            "--folds", "2", "--seeds", "1",
            "--train_overrides", "deepspeed=null", "use_cpu=true", "max_steps=2", "learning_rate=5e-3",
            "per_device_train_batch_size=4", "gradient_accumulation_steps=1", "save_steps=1000", "logging_steps=1",
            "preprocessing_num_workers=1", "dataloader_num_workers=0", "plot_loss=false",
            "--infer_flags", "--backend hf --max_new_tokens 12 --batch_size 16"]
    proc = run_tool("kfold", *args, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = load_records(train, images)
    ids = {r.id for r in records}
    folds = json.loads((out / "folds.json").read_text("utf-8"))["assignment"]
    for k in (0, 1):
        held = {r["id"] for r in json.loads((out / f"fold_{k}" / "heldout.json").read_text("utf-8"))}
        trained = {r["id"] for r in json.loads((out / f"fold_{k}" / "train.json").read_text("utf-8"))}
        assert held == {i for i, f in folds.items() if f == k} and held | trained == ids and not held & trained
        assert (out / f"fold_{k}" / "seed_1" / "model" / "model.safetensors").is_file()
    oof = [json.loads(line) for line in (out / "oof_predictions.jsonl").read_text("utf-8").splitlines()]
    assert sorted(row["id"] for row in oof) == sorted(ids)  # exactly one out-of-fold prediction per record
    assert all(row["fold"] == folds[row["id"]] for row in oof)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    suspects = read_corrections(out / "suspects.jsonl") if summary["suspects"] else []
    wrong = [row for row in oof if row["predicted"] is not None and row["predicted"] != row["gold"]]
    assert [s.id for s in suspects] == [r.id for r in records if r.id in {row["id"] for row in wrong}]
    assert (out / "review.html").is_file()

    # a rerun resumes: both folds are predicted, nothing trains again
    again = run_tool("kfold", *args, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 of 2 (fold, seed) runs already predicted, skipped" in again.stdout
    assert json.loads(again.stdout.strip().splitlines()[-1]) == summary


def test_suspects_need_agreement_across_seeds_and_feed_convert(small_train, tmp_path):
    """collect() over prediction files as tools.vllm_infer writes them (two seeds): a record both seeds put in the
    same other class is a suspect; one seed alone, or two different wrong labels, or an invalid answer, is not."""
    train, images = small_train
    records = load_records(train, images)
    folds = assign_folds(records, 2, seed=0)
    image = [r for r in records if r.task == "image"]
    both, one, split = image[0], image[1], image[2]
    others = {r.id: [label for label in IMAGE_CLASSES if label != r.output] for r in image}
    out = tmp_path / "kfold"
    for k in (0, 1):
        for seed in (1, 2):
            rows = []
            for r in records:
                if folds[r.id] != k:
                    continue
                answer = r.output
                if r is both or (r is one and seed == 1):
                    answer = others[r.id][0]
                elif r is split:
                    answer = others[r.id][seed - 1]
                elif r.task == "dialogue" and seed == 1:
                    answer = "说不清"  # invalid: no vote for any label
                rows.append(json.dumps({"id": r.id, "prompt": "", "predict": answer, "label": ""}, ensure_ascii=False))
            path = out / f"fold_{k}" / f"seed_{seed}" / "predictions.jsonl"
            path.parent.mkdir(parents=True)
            path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    args = KFoldArgs(input_file=str(train), image_dir=str(images), output_dir=str(out), model_name_or_path="unused",
                     folds=2, seeds=[1, 2])
    summary = collect(args, records, folds, out)
    suspects = read_corrections(out / "suspects.jsonl")
    assert [s.id for s in suspects] == [both.id] and summary["suspects"] == 1
    assert (suspects[0].status, suspects[0].gold, suspects[0].label) == ("suspected", both.output, others[both.id][0])
    assert [e["seed"] for e in suspects[0].evidence] == [1, 2]
    n = len(records)
    assert summary["oof_accuracy"] == {"1": (n - 3 - 9) / n, "2": (n - 2) / n}
    args.min_agreement = 0.5
    assert collect(args, records, folds, out)["suspects"] == 3  # one seed of two is enough now

    args.min_agreement = 1.0
    collect(args, records, folds, out)
    text = (out / "suspects.jsonl").read_text("utf-8").replace('"status": "suspected"', '"status": "accepted"')
    corrections = tmp_path / "corrections.jsonl"
    corrections.write_text(text, encoding="utf-8")
    data = tmp_path / "data"
    run_tool("convert", "--input_file", train, "--image_dir", images, "--output_dir", data, "--val_size", "0",
             "--corrections_file", corrections, "--quick", check=True)
    rows = {r["id"]: r["messages"][-1]["content"] for r in json.loads((data / "mire_train.json").read_text("utf-8"))}
    assert rows[both.id] == others[both.id][0] != both.output
    assert all(rows[r.id] == r.output for r in records if r is not both)


@pytest.mark.parametrize("flags, says", [
    ("--augment 1 --output_dir elsewhere", "--convert_flags: --output_dir is set by tools.kfold"),
    ("--val_size 0.2", "--convert_flags: --val_size is set by tools.kfold"),
    ("--prompt_variant cot", "--prompt_variant is set by tools.kfold (tools.kfold's --prompt_variant)"),
    ("--corrections_file c.jsonl", "--convert_flags: --corrections_file is set by tools.kfold"),
    ("--augment 1 --no_such_flag 3", "--convert_flags: unrecognized arguments: --no_such_flag 3"),
    ("--augment two", "--convert_flags: argument --augment: invalid int value: 'two'"),
    ("--dialogue_image_max_pixels 10", "--convert_flags: --dialogue_image_max_pixels must be at least 3136"),
    ("--augment 1 '--seed", "--convert_flags: No closing quotation"),
    ("--info_file no_such_info.jsonl", "no_such_info.jsonl: not found (--convert_flags --info_file)"),
    ("--info_file tests/conftest.py", "--info_file: prompt variant plain puts no image text in the prompt"),
])
def test_convert_flags_refused_before_any_fold(small_train, tmp_path, flags, says):
    """Checked by tools.convert's own parser before anything runs: one line, exit 2, nothing written."""
    train, images = small_train
    out = tmp_path / "kfold"
    proc = run_tool("kfold", "--input_file", train, "--image_dir", images, "--output_dir", out,
                    "--model_name_or_path", "unused", "--folds", "2", f"--convert_flags={flags}", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists()


@pytest.mark.slow
def test_kfold_folds_convert_like_the_users_training(small_train, tiny_model_dir, tmp_path):
    """--convert_flags reach every fold: the fold's training data has the augmented copies and the per-task cap, the
    held-out fold the cap but no copies, and its inference runs with the cap (tools.vllm_infer would refuse a
    mismatch); --corrections_file relabels before the split, so the folds train on and are checked against it."""
    from mire_factory.augment import AUGMENT_KEY
    from mire_factory.dataset_info import TASK_MAX_PIXELS_KEY
    from mire_factory.infer.origin import meta_path

    train, images = small_train
    records = load_records(train, images)
    fixed = next(r for r in records if r.task == "image")
    new_label = next(label for label in IMAGE_CLASSES if label != fixed.output)
    corrections = tmp_path / "corrections.jsonl"
    corrections.write_text(json.dumps({"id": fixed.id, "status": "accepted", "gold": fixed.output, "label": new_label},
                                      ensure_ascii=False) + "\n", encoding="utf-8")
    out = tmp_path / "kfold"
    flags = "--augment 1 --augment_mask_ratio 0.5 --dialogue_image_max_pixels 3136"
    args = ["--input_file", train, "--image_dir", images, "--output_dir", out, "--model_name_or_path", tiny_model_dir,
            "--folds", "2", "--seeds", "1", "--corrections_file", corrections,
            "--train_overrides", "deepspeed=null", "use_cpu=true", "max_steps=1", "save_steps=1000",
            "per_device_train_batch_size=4", "gradient_accumulation_steps=1", "logging_steps=1",
            "preprocessing_num_workers=1", "dataloader_num_workers=0", "plot_loss=false",
            "--infer_flags", "--backend hf --max_new_tokens 4 --batch_size 16"]
    proc = run_tool("kfold", *args, "--convert_flags", flags, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    caps = {"image": None, "dialogue": 3136}
    for k in (0, 1):
        fold = out / f"fold_{k}"
        trained = json.loads((fold / "train.json").read_text("utf-8"))
        held = json.loads((fold / "heldout.json").read_text("utf-8"))
        info = json.loads((fold / "data" / "dataset_info.json").read_text("utf-8"))
        rows = json.loads((fold / "data" / "mire_train.json").read_text("utf-8"))
        assert len(rows) == 2 * len(trained) and info["mire_train"][AUGMENT_KEY]["copies"] == 1
        assert any("*" in m["content"] for row in rows for m in row["messages"] if m["role"] == "user")
        test_rows = json.loads((fold / "data" / "mire_test.json").read_text("utf-8"))
        assert len(test_rows) == len(held) and AUGMENT_KEY not in info["mire_test"]
        assert not any("*" in m["content"] for row in test_rows for m in row["messages"])  # no masked copy
        assert [r["id"] for r in test_rows] == [r["id"] for r in held]
        assert info["mire_train"][TASK_MAX_PIXELS_KEY] == info["mire_test"][TASK_MAX_PIXELS_KEY] == caps
        meta = json.loads(meta_path(fold / "seed_1" / "predictions.jsonl").read_text("utf-8"))
        assert meta["origin"]["task_image_max_pixels"] == "dialogue=3136"
        if any(r["id"] == fixed.id for r in trained):
            assert next(r for r in trained if r["id"] == fixed.id)["output"] == new_label
    oof = [json.loads(line) for line in (out / "oof_predictions.jsonl").read_text("utf-8").splitlines()]
    assert sorted(row["id"] for row in oof) == sorted(r.id for r in records)
    assert next(row for row in oof if row["id"] == fixed.id)["gold"] == new_label

    # a rerun with the same flags resumes; with other conversion flags it is refused: the folds would mix two ways
    again = run_tool("kfold", *args, "--convert_flags", flags, timeout=300)
    assert again.returncode == 0 and "2 of 2 (fold, seed) runs already predicted" in again.stdout, again.stderr
    other = run_tool("kfold", *args, "--convert_flags", "--augment 2 --dialogue_image_max_pixels 3136", timeout=300)
    assert other.returncode == 2 and other.stderr.count("\n") == 1, other.stderr
    assert "folds.json: field 'convert_flags': the folds were converted with another --convert_flags" in other.stderr


def test_failing_step_names_its_whole_last_line(tmp_path):
    """A fold's failing subprocess: its whole last line (a long path and field included), on one line."""
    from mire_factory.io import MireInputError
    from mire_factory.kfold import _run

    last = "error: " + "/very/long/path/" * 30 + "train.json: record 'r1': field 'images': not found"
    script = f"import sys; print('early output'); print({last!r}); print('   '); sys.exit(3)"
    with pytest.raises(MireInputError) as caught:
        _run([sys.executable, "-c", script], tmp_path / "step.log", "tools.convert of fold 0")
    assert caught.value.lines == [f"tools.convert of fold 0 failed with exit code 3 ({last}); its whole output: "
                                  f"{tmp_path / 'step.log'}"]
