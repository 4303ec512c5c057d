"""tools.kfold: folds, out-of-fold predictions through the real llamafactory-cli and tools.vllm_infer, suspects."""

from __future__ import annotations

import json
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
