import json
import os
from collections import Counter

import pytest

from conftest import run_tool
from mire_factory.convert import stratified_split
from mire_factory.io import read_json
from mire_factory.records import load_records
from mire_factory.sharegpt import sharegpt_entry
from mire_factory.synthetic import make_records, write_dataset
from mire_factory.taxonomy import normalize_label


def _convert(*args):
    proc = run_tool("convert", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_real_sample_all_24_intact(mire_sample, tmp_path):
    out = tmp_path / "deep" / "out"  # not beside the images: paths must climb with ../
    proc = _convert("--input_file", mire_sample / "train_sample.json", "--image_dir", mire_sample / "images",
                    "--output_dir", out, "--val_size", "0")
    raw = {r["id"]: r for r in read_json(mire_sample / "train_sample.json")}
    rows = read_json(out / "mire_train.json")
    assert len(rows) == 24 and [r["id"] for r in rows] == list(raw)
    for row in rows:
        src = raw[row["id"]]
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert user["content"] == src["instruction"]  # <image>, <http>, full/half-width punctuation untouched
        assert assistant["content"] == normalize_label(src["output"])
        assert len(row["images"]) == len(src["image"]) == user["content"].count("<image>")
        for path, name in zip(row["images"], src["image"], strict=True):
            assert not os.path.isabs(path) and path.startswith("..")
            assert os.path.samefile(out / path, mire_sample / "images" / name)  # same file, same order
    counts = Counter(len(r["images"]) for r in rows)
    assert counts[0] == 1 and counts[4] == 1
    assert "images per record: 0: 1, 1: 19, 3: 3, 4: 1" in proc.stdout
    assert read_json(out / "dataset_info.json") == {"mire_train": sharegpt_entry("mire_train.json")}


def test_real_sample_split_is_stratified_and_deterministic(mire_sample, tmp_path):
    args = ["--input_file", mire_sample / "train_sample.json", "--image_dir", mire_sample / "images"]
    _convert(*args, "--output_dir", tmp_path / "a")
    _convert(*args, "--output_dir", tmp_path / "b")
    for name in ("mire_train.json", "mire_val.json", "dataset_info.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    train, val = read_json(tmp_path / "a" / "mire_train.json"), read_json(tmp_path / "a" / "mire_val.json")
    assert len(val) == round(24 * 0.1) and len(train) + len(val) == 24
    train_labels = Counter(r["messages"][1]["content"] for r in train)
    assert all(train_labels[r["messages"][1]["content"]] >= 1 for r in val)
    assert set(read_json(tmp_path / "a" / "dataset_info.json")) == {"mire_train", "mire_val"}


def test_stratified_split_properties(synthetic_train):
    records = load_records(*synthetic_train)
    classes = Counter((r.task, r.output) for r in records)
    for val_size, seed in [(0.1, 42), (0.3, 1), (0.5, 7), (0.9, 3)]:
        train, val = stratified_split(records, val_size, seed)
        assert len(val) == min(round(len(records) * val_size), sum(n - 1 for n in classes.values()))
        assert sorted(r.id for r in train + val) == sorted(r.id for r in records)
        kept = Counter((r.task, r.output) for r in train)
        assert all(kept[c] >= 1 for c, n in classes.items() if n >= 2)
        assert [r.index for r in train] == sorted(r.index for r in train)  # input order kept
        assert [r.id for r in stratified_split(records, val_size, seed)[1]] == [r.id for r in val]
    assert {r.id for r in stratified_split(records, 0.3, 1)[1]} != {r.id for r in stratified_split(records, 0.3, 2)[1]}
    singletons = [r for r in records if classes[(r.task, r.output)] == 1]
    train, _ = stratified_split(records, 0.5, 0)
    assert {r.id for r in singletons} <= {r.id for r in train}


def test_test_file_task_filter_and_merge(tmp_path):
    records = make_records(4, 6, tmp_path / "images", seed=5, with_labels=False)
    records[0]["input"] = "补充说明"
    write_dataset(tmp_path / "test.json", records)
    out = tmp_path / "images" / "out"  # inside the image dir: paths climb one level
    out.mkdir()
    (out / "dataset_info.json").write_text(json.dumps({"other": {"file_name": "x.json"}}), encoding="utf-8")
    _convert("--input_file", tmp_path / "test.json", "--image_dir", tmp_path / "images", "--output_dir", out,
             "--task", "dialogue")
    info = read_json(out / "dataset_info.json")
    assert set(info) == {"other", "mire_dialogue_test"} and info["other"] == {"file_name": "x.json"}
    rows = read_json(out / "mire_dialogue_test.json")
    dialogues = [r for r in records if "多轮对话" in r["instruction"]]
    assert [r["id"] for r in rows] == [r["id"] for r in dialogues]
    for row, src in zip(rows, dialogues, strict=True):
        assert row["messages"][1] == {"role": "assistant", "content": ""}  # kept by LLaMA-Factory for predict
        assert all(p.startswith("../") and (out / p).is_file() for p in row["images"])
        expected = src["instruction"] + ("\n" + src["input"] if src["input"] else "")
        assert row["messages"][0]["content"] == expected
    _convert("--input_file", tmp_path / "test.json", "--image_dir", tmp_path / "images", "--output_dir", out,
             "--task", "image")
    assert set(read_json(out / "dataset_info.json")) == {"other", "mire_dialogue_test", "mire_image_test"}
    assert len(read_json(out / "mire_image_test.json")) == 4


def test_swift_format(synthetic_train, tmp_path):
    train_file, image_dir = synthetic_train
    _convert("--input_file", train_file, "--image_dir", image_dir, "--output_dir", tmp_path, "--format", "swift")
    lines = (tmp_path / "mire_train.jsonl").read_text(encoding="utf-8").splitlines()
    lines += (tmp_path / "mire_val.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 92 and not (tmp_path / "dataset_info.json").exists()
    for row in rows:
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert all(os.path.isabs(p) and os.path.isfile(p) for p in row["images"])
        assert row["messages"][0]["content"].count("<image>") == len(row["images"])


def _bad(case, records, root):
    r = next(x for x in records if len(x["image"]) >= 2)
    if case == "missing_output":
        del r["output"]
        return r["id"], "output"
    if case == "image_missing":
        (root / "images" / r["image"][1]).unlink()
        return r["id"], "image[1]"
    if case == "placeholder_count":
        r["image"] = r["image"][:1]
        return r["id"], "image"
    if case == "unknown_label":
        r["output"] = "没有这个标签"
        return r["id"], "output"
    if case == "input_has_image":
        r["input"] = "<image>"
        return r["id"], "input"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing_output", "image_missing", "placeholder_count", "unknown_label",
                                  "input_has_image", "broken_dataset_info", "no_records_of_task"])
def test_bad_input_exits_2_and_writes_nothing(case, tmp_path):
    records = make_records(0, 8, tmp_path / "images", seed=11, max_dialogue_images=3, image_format="JPEG")
    if not any(len(r["image"]) >= 2 for r in records):
        pytest.fail("the synthetic data should hold a dialogue with two images")
    out = tmp_path / "out"
    out.mkdir()
    (out / "dataset_info.json").write_text('{"keep": {"file_name": "k.json"}}', encoding="utf-8")
    extra = []
    if case == "broken_dataset_info":
        (out / "dataset_info.json").write_text("{not json", encoding="utf-8")
        rid, field = None, None
    elif case == "no_records_of_task":
        extra, rid, field = ["--task", "image"], None, None
    else:
        rid, field = _bad(case, records, tmp_path)
    write_dataset(tmp_path / "train.json", records)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = run_tool("convert", "--input_file", tmp_path / "train.json", "--image_dir", tmp_path / "images",
                    "--output_dir", out, "--kind", "train", *extra)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors and "Traceback" not in proc.stderr
    if rid is not None:
        assert any(rid in line and f"field '{field}'" in line for line in errors), errors
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written, no temp files left


def test_a_test_file_with_empty_outputs_converts_as_a_test_set(tmp_path):
    """The natural shape of a MIRE test file (alpaca-style registration needs the key): `"output": ""`."""
    records = make_records(3, 4, tmp_path / "images", seed=6)
    for r in records:
        r["output"] = ""
    write_dataset(tmp_path / "test.json", records)
    proc = _convert("--input_file", tmp_path / "test.json", "--image_dir", tmp_path / "images", "--output_dir",
                    tmp_path / "out")
    assert set(read_json(tmp_path / "out" / "dataset_info.json")) == {"mire_test"}
    rows = read_json(tmp_path / "out" / "mire_test.json")
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    assert all(r["messages"][1]["content"] == "" for r in rows)
    assert "mire_test: 7 records" in proc.stdout


def test_a_mixed_file_is_refused_and_kind_test_keeps_every_record_in_the_test_set(tmp_path):
    records = make_records(3, 4, tmp_path / "images", seed=6)
    del records[2]["output"]  # one train record without its label: the old rule converted this file as a test set
    write_dataset(tmp_path / "train.json", records)
    out = tmp_path / "out"
    proc = run_tool("convert", "--input_file", tmp_path / "train.json", "--image_dir", tmp_path / "images",
                    "--output_dir", out)
    assert proc.returncode == 2 and f"record {records[2]['id']!r}: field 'output'" in proc.stderr
    assert not out.exists()
    _convert("--input_file", tmp_path / "train.json", "--image_dir", tmp_path / "images", "--output_dir", out,
             "--kind", "test")
    assert set(read_json(out / "dataset_info.json")) == {"mire_test"}  # --kind test: one test split, labels kept
    rows = {r["id"]: r for r in read_json(out / "mire_test.json")}
    assert len(rows) == 7 and rows[records[2]["id"]]["messages"][1]["content"] == ""
    assert rows[records[0]["id"]]["messages"][1]["content"] == records[0]["output"]


def test_prompt_variant_writes_every_split_and_is_recorded(tmp_path):
    from mire_factory.prompt_variants import get_prompt_variant
    from mire_factory.prompts import LABEL_KEY, REASON_KEY, cot_user_suffix

    train = make_records(6, 6, tmp_path / "images", seed=2, image_classes=("商品头图", "退款页面"),
                         dialogue_classes=("是否好用", "气泡"))
    test = [{**r, "output": ""} for r in make_records(2, 2, tmp_path / "images", seed=3, id_prefix="t")]
    write_dataset(tmp_path / "train.json", train)
    write_dataset(tmp_path / "test.json", test)
    out = tmp_path / "out"
    for name in ("train", "test"):
        _convert("--input_file", tmp_path / f"{name}.json", "--image_dir", tmp_path / "images", "--output_dir", out,
                 "--prompt_variant", "cot", "--val_size", "0.25")
    info = read_json(out / "dataset_info.json")
    assert {name: entry["mire_prompt_variant"] for name, entry in info.items()} == {
        "mire_train": "cot", "mire_val": "cot", "mire_test": "cot"}
    assert info["mire_test"] == sharegpt_entry("mire_test.json", "cot")
    source = {r["id"]: r for r in train + test}
    for split in ("train", "val", "test"):
        for row in read_json(out / f"mire_{split}.json"):
            src = source[row["id"]]
            task = "dialogue" if "多轮对话" in src["instruction"] else "image"
            assert row["messages"][0]["content"] == src["instruction"] + cot_user_suffix(task, "last")
            answer = row["messages"][1]["content"]
            if split == "test":
                assert answer == ""
            else:  # label-only CoT JSON, the format tools.merge_cot fills with reasons
                assert json.loads(answer) == {REASON_KEY: "", LABEL_KEY: src["output"]}
                assert answer == get_prompt_variant("cot").answer(src["output"])
    # a later split in another variant: converted, with a warning naming the other splits
    proc = _convert("--input_file", tmp_path / "test.json", "--image_dir", tmp_path / "images", "--output_dir", out)
    assert "mire_train in" in proc.stderr and "registered with prompt variant 'cot'" in proc.stderr
    assert read_json(out / "dataset_info.json")["mire_test"]["mire_prompt_variant"] == "plain"
