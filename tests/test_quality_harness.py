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


@pytest.mark.slow
def test_harness_smoke_every_stage_then_resumes(split, tiny_model_dir, tmp_path):
    """--smoke with the tiny model: every stage runs through the project's tools for two seeds, then the report
    and the plot; a rerun skips every stage, and a lost output reruns its stage alone."""
    work, results = tmp_path / "work", tmp_path / "results"
    args = [HARNESS, "--train_file", split / "train.json", "--test_file", split / "test.json", "--image_dir",
            split / "images", "--seeds", 0, 1, "--out", "t", "--smoke", "--model_dir", tiny_model_dir,
            "--workdir", work, "--results_dir", results, "--device", "cpu", "--parallel", 2]
    proc = script(*args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((results / "t.json").read_text(encoding="utf-8"))
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
        assert result["callback_vs_tools"][seed]["records"] == 8
    assert (results / "t_eval_f1.png").stat().st_size > 10_000
    assert {"untrained", "train_label_s1", "infer_label_s1"} <= set(result["timings_s"])

    proc = script(*args)
    assert proc.returncode == 0 and proc.stdout.count("done earlier") == 9, proc.stdout
    (work / "label_s1" / "infer" / "metrics.json").unlink()
    proc = script(*args)
    assert proc.returncode == 0 and proc.stdout.count("done earlier") == 8, proc.stdout
    assert "[infer_label_s1] ..." in proc.stdout
