import json
import shutil

import pytest
from PIL import Image

from conftest import run_tool
from mire_factory.records import load_records
from mire_factory.synthetic import make_records


def test_real_sample_validates(mire_sample):
    proc = run_tool("validate", "--input_file", mire_sample / "train_sample.json", "--image_dir", mire_sample / "images")
    assert proc.returncode == 0, proc.stderr
    assert "24 records (12 image, 12 dialogue), 32 images, 24 labelled" in proc.stdout
    records = load_records(mire_sample / "train_sample.json", mire_sample / "images")
    assert sorted(len(r.images) for r in records if r.task == "dialogue")[:1] == [0]
    assert max(len(r.images) for r in records) == 4


@pytest.fixture()
def good(tmp_path):
    records = make_records(2, 3, tmp_path / "images", seed=3, max_dialogue_images=2)
    for r in records:  # at least one dialogue with images, so the image cases have a target
        if r["image"] and "多轮对话" in r["instruction"]:
            break
    else:
        pytest.fail("synthetic data should hold a dialogue with images")
    return records, tmp_path


def _write(tmp_path, obj, name="data.json"):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return path


def _first_with_image(records):
    return next(r for r in records if r["image"])


def _break(case, records, tmp_path):
    r = _first_with_image(records)
    rid = r["id"]
    if case == "missing_field":
        del r["instruction"]
        return rid, "instruction", "missing field"
    if case == "wrong_type":
        r["image"] = "a.png"
        return rid, "image", "expected a list"
    if case == "duplicate_id":
        other = next(x for x in records if x is not r)
        other["id"] = rid
        return rid, "id", "duplicate id"
    if case == "placeholder_count":
        r["image"] = r["image"] + [r["image"][0]]
        return rid, "image", "placeholders but"
    if case == "image_missing":
        (tmp_path / "images" / r["image"][0]).unlink()
        return rid, "image[0]", "image not found"
    if case == "undecodable":
        (tmp_path / "images" / r["image"][0]).write_bytes(b"this is not an image")
        return rid, "image[0]", "cannot decode"
    if case == "outside_dotdot":
        r["image"][0] = "../secret.png"
        Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")
        return rid, "image[0]", "outside the image directory"
    if case == "outside_absolute":
        r["image"][0] = str(tmp_path / "images" / r["image"][0])
        return rid, "image[0]", "outside the image directory"
    if case == "unknown_label":
        r["output"] = "不存在的标签"
        return rid, "output", "unknown label"
    if case == "no_id":
        del r["id"]
        return f"#{records.index(r)}", "id", "missing field"
    raise AssertionError(case)


CASES = ["missing_field", "wrong_type", "duplicate_id", "placeholder_count", "image_missing", "undecodable",
         "outside_dotdot", "outside_absolute", "unknown_label", "no_id"]


@pytest.mark.parametrize("case", CASES)
def test_each_bad_case_exits_2_naming_record_and_field(case, good):
    records, tmp_path = good
    rid, field, message = _break(case, records, tmp_path)
    path = _write(tmp_path, records)
    proc = run_tool("validate", "--input_file", path, "--image_dir", tmp_path / "images")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert lines, proc.stderr
    hit = [line for line in lines if rid in line and f"field '{field}'" in line and message in line]
    assert hit, lines
    assert str(path) in hit[0]
    assert "Traceback" not in proc.stderr


def test_not_a_list_and_not_json(tmp_path):
    (tmp_path / "images").mkdir()
    proc = run_tool("validate", "--input_file", _write(tmp_path, {"id": 1}), "--image_dir", tmp_path / "images")
    assert proc.returncode == 2 and "expected a JSON list" in proc.stderr
    proc = run_tool("validate", "--input_file", _write(tmp_path, "[{", "b.json"), "--image_dir", tmp_path / "images")
    assert proc.returncode == 2 and "not valid JSON" in proc.stderr
    proc = run_tool("validate", "--input_file", tmp_path / "nope.json", "--image_dir", tmp_path / "images")
    assert proc.returncode == 2 and "file not found" in proc.stderr


def test_unknown_task_text(good):
    records, tmp_path = good
    r = next(x for x in records if not x["image"]) if any(not x["image"] for x in records) else records[0]
    r["instruction"] = "随便聊聊" + "<image>" * len(r["image"])
    proc = run_tool("validate", "--input_file", _write(tmp_path, records), "--image_dir", tmp_path / "images")
    assert proc.returncode == 2 and "cannot tell the task" in proc.stderr and r["id"] in proc.stderr


def test_test_files_need_no_output(good):
    records, tmp_path = good
    for r in records:
        del r["output"]
    proc = run_tool("validate", "--input_file", _write(tmp_path, records), "--image_dir", tmp_path / "images")
    assert proc.returncode == 0, proc.stderr
    proc = run_tool("validate", "--input_file", _write(tmp_path, records), "--image_dir", tmp_path / "images",
                    "--kind", "train")
    assert proc.returncode == 2 and "field 'output': missing field" in proc.stderr


def test_truncated_image_fails_by_default_and_quick_reads_headers(good):
    records, tmp_path = good
    r = _first_with_image(records)
    img_path = tmp_path / "images" / r["image"][0]
    Image.new("RGB", (300, 300), (10, 200, 30)).save(img_path.with_suffix(".jpg"), format="JPEG")
    data = img_path.with_suffix(".jpg").read_bytes()
    shutil.move(img_path.with_suffix(".jpg"), img_path)
    img_path.write_bytes(data[: len(data) // 2])
    path = _write(tmp_path, records)
    proc = run_tool("validate", "--input_file", path, "--image_dir", tmp_path / "images")
    assert proc.returncode == 2 and "cannot decode" in proc.stderr and "truncated" in proc.stderr, proc.stderr
    assert f"record {r['id']!r}: field 'image[0]'" in proc.stderr
    proc = run_tool("validate", "--input_file", path, "--image_dir", tmp_path / "images", "--verify_images")
    assert proc.returncode == 2 and "cannot decode" in proc.stderr  # the old flag is accepted, a no-op
    proc = run_tool("validate", "--input_file", path, "--image_dir", tmp_path / "images", "--quick")
    assert proc.returncode == 0 and "--quick" in proc.stdout, proc.stderr


# --- the kind of a file: decided for the whole file, one rule for every tool -----------------------------------------


def _labelled(records, keep):
    """records with `output` kept for the indices in `keep`, set to "" for the others."""
    return [{**r, "output": r["output"] if k in keep else ""} for k, r in enumerate(records)]


def test_empty_outputs_make_a_test_file(good):
    records, tmp_path = good
    path = _write(tmp_path, _labelled(records, keep=set()))
    for kind in ("auto", "test"):
        proc = run_tool("validate", "--input_file", path, "--image_dir", tmp_path / "images", "--kind", kind)
        assert proc.returncode == 0, proc.stderr
        assert "test file" in proc.stdout and "0 labelled" in proc.stdout
    proc = run_tool("validate", "--input_file", path, "--image_dir", tmp_path / "images", "--kind", "train")
    assert proc.returncode == 2 and "field 'output': empty: a train record needs its gold label" in proc.stderr


@pytest.mark.parametrize("n_labelled", [1, 4])
def test_a_mix_of_labelled_and_unlabelled_records_is_refused(good, n_labelled):
    """auto: a mix names the first record of the smaller group (1 of 5 labelled: that one; 4 of 5: the one without);
    --kind test accepts it, --kind train names every record without a label."""
    records, tmp_path = good
    keep = set(range(1, 1 + n_labelled))
    mixed = _labelled(records, keep)
    if n_labelled == 4:
        del mixed[0]["output"]  # absent counts as unlabelled, like ""
    path = _write(tmp_path, mixed)
    minority = records[1]["id"] if n_labelled == 1 else records[0]["id"]
    proc = run_tool("validate", "--input_file", path, "--image_dir", tmp_path / "images")
    assert proc.returncode == 2, proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"record {minority!r}: field 'output'" in errors[0], errors
    assert f"{n_labelled} records are labelled and {5 - n_labelled} are not" in errors[0]
    proc = run_tool("validate", "--input_file", path, "--image_dir", tmp_path / "images", "--kind", "test")
    assert proc.returncode == 0 and f"{n_labelled} labelled" in proc.stdout, proc.stderr
    proc = run_tool("validate", "--input_file", path, "--image_dir", tmp_path / "images", "--kind", "train")
    assert proc.returncode == 2 and proc.stderr.count("error:") == 5 - n_labelled


def test_a_train_file_whose_first_record_lacks_output_is_not_a_test_file(good):
    """The old rule looked at the first record only: this file converted silently as a test set."""
    records, tmp_path = good
    del records[0]["output"]
    mire = records[0]["id"]
    proc = run_tool("validate", "--input_file", _write(tmp_path, records), "--image_dir", tmp_path / "images")
    assert proc.returncode == 2 and f"record {mire!r}: field 'output': has none" in proc.stderr
