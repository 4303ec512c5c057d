"""tools.extract_info --backend ocr: the real RapidOCR model (PP-OCRv4, from the installed wheel) on rendered text, so it
runs without ../shared, and on real screenshots of ../shared/mire_sample; resume, kills and refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from PIL import Image, ImageDraw, ImageFont

from conftest import REPO, run_tool
from mire_factory.image_info import InfoRecord, file_sha256
from mire_factory.io import output_lock
from mire_factory.synthetic import make_records, write_dataset

# rapidocr-onnxruntime is a dependency wherever its wheel installs (Python < 3.13, pyproject's marker)
pytestmark = pytest.mark.skipif(sys.version_info >= (3, 13), reason="rapidocr-onnxruntime supports Python < 3.13")
LINES_A = ["ORDER 20240915", "REFUND 128.50 USD", "RETURN ACCEPTED"]
LINES_B = ["TRACKING 7731", "DELIVERED"]


def render(path: Path, lines: list[str], size=(720, 360)) -> None:
    """Black text on white in Pillow's own scalable font (no system fonts needed)."""
    font = ImageFont.load_default(size=40)
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    for k, line in enumerate(lines):
        draw.text((40, 40 + 100 * k), line, fill="black", font=font)
    img.save(path)


def squash(text: str) -> str:
    return "".join(text.split())  # the Chinese recogniser drops the spaces between Latin words


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def text_images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ocr_images")
    render(root / "a.png", LINES_A)
    (root / "sub").mkdir()
    render(root / "sub" / "b.png", LINES_B)
    (root / "sub" / "b_copy.png").write_bytes((root / "sub" / "b.png").read_bytes())
    Image.new("RGB", (300, 200), "white").save(root / "blank.jpg")
    (root / "notes.txt").write_text("not an image", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def ocr_run(text_images, tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("ocr_out") / "info.jsonl"
    proc = run_tool("extract_info", "--image_dir", text_images, "--output_file", out, "--no_progress")
    return out, proc


def test_ocr_reads_rendered_text_in_reading_order(ocr_run, text_images):
    out, proc = ocr_run
    assert proc.returncode == 0, proc.stderr
    rows = {r["image"]: r for r in rows_of(out)}
    assert sorted(rows) == ["a.png", "blank.jpg", "sub/b.png", "sub/b_copy.png"]  # .txt is not an image
    a = rows["a.png"]
    assert a["status"] == "ok" and a["backend"] == "ocr" and a["model"].startswith("rapidocr-onnxruntime==")
    assert a["text"].split("\n") == [line["text"] for line in a["lines"]]
    assert [squash(t) for t in a["text"].split("\n")] == [squash(t) for t in LINES_A]
    assert (a["width"], a["height"]) == (720, 360) and a["sha256"] == file_sha256(text_images / "a.png")
    for k, line in enumerate(a["lines"]):
        xs, ys = [p[0] for p in line["box"]], [p[1] for p in line["box"]]
        assert len(line["box"]) == 4 and 0 <= min(xs) < max(xs) <= 720
        assert 40 + 100 * k - 10 <= min(ys) < max(ys) <= 40 + 100 * k + 60  # the box sits on its line
        assert line["score"] > 0.9
    assert [squash(t) for t in rows["sub/b.png"]["text"].split("\n")] == [squash(t) for t in LINES_B]
    assert rows["blank.jpg"]["status"] == "ok" and rows["blank.jpg"]["text"] == "" and rows["blank.jpg"]["lines"] == []
    # the copy has the same bytes: its row is the original's, made without reading it again
    copy = rows["sub/b_copy.png"]
    assert {k: v for k, v in copy.items() if k not in ("image", "latency_s")} == \
        {k: v for k, v in rows["sub/b.png"].items() if k not in ("image", "latency_s")}
    assert "4 images" in proc.stdout or "3 images" in proc.stdout


def test_rerun_skips_done_images_and_repairs_a_cut_line(ocr_run, text_images, tmp_path):
    out, _ = ocr_run
    info = tmp_path / "info.jsonl"
    info.write_bytes(out.read_bytes())
    before = info.read_bytes()
    proc = run_tool("extract_info", "--image_dir", text_images, "--output_file", info, "--no_progress")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("0 images") and "skipped 4 already done" in proc.stdout
    assert info.read_bytes() == before
    # a kill in the middle of a write leaves the start of a line; the rerun cuts it and goes on
    with open(info, "ab") as f:
        f.write(b'{"image": "c.png", "sha2')
    (text_images / "renamed").mkdir(exist_ok=True)
    (text_images / "renamed" / "a_again.png").write_bytes((text_images / "a.png").read_bytes())
    try:
        proc = run_tool("extract_info", "--image_dir", text_images, "--output_file", info, "--no_progress")
    finally:
        (text_images / "renamed" / "a_again.png").unlink()
        (text_images / "renamed").rmdir()
    assert proc.returncode == 0, proc.stderr
    assert "dropped an unfinished last line" in proc.stdout and "copied 1 done before" in proc.stdout
    rows = rows_of(info)
    assert info.read_bytes().startswith(before) and len(rows) == 5
    assert rows[-1]["image"] == "renamed/a_again.png"
    assert rows[-1]["text"] == next(r["text"] for r in rows if r["image"] == "a.png")


def _teacher_row(name: str) -> str:
    return InfoRecord(name, "0" * 64, "teacher", "some-vlm", "ok", text="x", prompt_sha256="1" * 64).to_json()


@pytest.mark.parametrize("case", ["train_json", "other_origin", "directory", "broken_middle"])
def test_refuses_an_output_that_is_not_its_info_file(case, text_images, synthetic_train, tmp_path):
    target = tmp_path / "out.jsonl"
    if case == "train_json":
        target.write_bytes(synthetic_train[0].read_bytes())
        why = "not an info file"
    elif case == "other_origin":
        target.write_text(_teacher_row("a.png") + "\n", encoding="utf-8")
        why = "one info file holds one origin"
    elif case == "directory":
        target.mkdir()
        why = "is a directory"
    else:
        target.write_text(_teacher_row("a.png") + "\n{broken\n" + _teacher_row("b.png") + "\n", encoding="utf-8")
        why = "line 2"
    before = target.read_bytes() if target.is_file() else None
    proc = run_tool("extract_info", "--image_dir", text_images, "--output_file", target, "--no_progress")
    assert proc.returncode == 2 and why in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert (target.read_bytes() if target.is_file() else None) == before
    assert not (tmp_path / ".out.jsonl.lock").exists()  # refused before a lock file appears


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, text_images):
    out = tmp_path / "info.jsonl"
    root = tmp_path / "data"
    write_dataset(root / "train.json", make_records(2, 2, root / "images", seed=3))
    missing = next(p for p in sorted((root / "images").iterdir()))
    missing.unlink()
    cases = [
        (["--image_dir", tmp_path / "nowhere"], "not a directory"),
        (["--image_dir", root / "images", "--input_file", root / "train.json"], missing.name),
        (["--image_dir", text_images, "--workers", "-1"], "--workers"),
        (["--image_dir", text_images, "--backend", "teacher"], "--base_url"),
        (["--image_dir", text_images, "--prompt_file", root / "train.json"], "--backend teacher"),
    ]
    for args, why in cases:
        proc = run_tool("extract_info", *args, "--output_file", out, "--no_progress")
        assert proc.returncode == 2 and why in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert not out.exists()


def test_a_second_writer_is_refused(text_images, tmp_path):
    out = tmp_path / "info.jsonl"
    with output_lock(out):
        proc = run_tool("extract_info", "--image_dir", text_images, "--output_file", out, "--no_progress")
    assert proc.returncode == 2 and "another tools.extract_info is writing it" in proc.stderr, proc.stderr
    assert not out.exists() or out.read_bytes() == b""


@pytest.mark.slow
def test_sigkill_loses_only_images_in_flight(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for k in range(10):
        render(images / f"p{k}.png", [f"PAGE {k:02d} ITEM {1000 + k}"], size=(640, 160))
    out = tmp_path / "info.jsonl"
    cmd = [sys.executable, "-m", "tools.extract_info", "--image_dir", str(images), "--output_file", str(out),
           "--workers", "1", "--no_progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and (not out.exists() or out.read_bytes().count(b"\n") < 2):
        time.sleep(0.05)
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert workers  # the OCR worker (and multiprocessing's resource tracker)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(workers, timeout=15)
    assert not alive, f"orphaned workers still running: {alive}"  # they leave with their parent
    kept = out.read_bytes()
    done = kept.count(b"\n")
    assert 2 <= done < 10
    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"skipped {done} already done" in rerun.stdout
    rows = rows_of(out)
    assert out.read_bytes().startswith(kept[: kept.rfind(b"\n") + 1])
    assert sorted(r["image"] for r in rows) == [f"p{k}.png" for k in range(10)]  # each once
    for r in rows:
        k = int(r["image"][1])
        assert r["status"] == "ok" and squash(r["text"]) == squash(f"PAGE {k:02d} ITEM {1000 + k}")


@pytest.mark.slow
def test_ocr_on_real_screenshots(mire_sample, tmp_path):
    """Two full-size phone screenshots of the real sample: a return page and a payment page."""
    pages = {"3fc85b30-3ab3-4cad-a2de-324e2ae6a078-1279-0.jpg": ["选择退货方式", "商家已同意退货"],
             "fac5b276-8b3f-48c3-af74-3d83b2a1535f-621-0.jpg": ["支付费用", "立即支付"]}
    images = tmp_path / "images"
    images.mkdir()
    for name in pages:  # links, not copies, of the shared data
        (images / name).symlink_to(mire_sample / "images" / name)
    out = tmp_path / "info.jsonl"
    proc = run_tool("extract_info", "--image_dir", images, "--output_file", out, "--no_progress")
    assert proc.returncode == 0, proc.stderr
    rows = {r["image"]: r for r in rows_of(out)}
    for name, expected in pages.items():
        lines = rows[name]["text"].split("\n")
        assert all(text in lines for text in expected), lines
        assert len(lines) >= 10
        with Image.open(mire_sample / "images" / name) as img:
            assert (rows[name]["width"], rows[name]["height"]) == img.size


def test_an_undecodable_image_fails_its_row_and_is_retried_on_request(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    render(images / "good.png", ["INVOICE 42"], size=(480, 120))
    render(images / "cut.jpg", ["CUT OFF"], size=(480, 120))
    data = (images / "cut.jpg").read_bytes()
    (images / "cut.jpg").write_bytes(data[: len(data) // 2])  # a truncated JPEG: its header reads, its pixels do not
    out = tmp_path / "info.jsonl"
    args = ["--image_dir", images, "--output_file", out, "--no_progress", "--workers", "1"]
    proc = run_tool("extract_info", *args)
    assert proc.returncode == 3 and "1 of 2 images of this run failed" in proc.stderr, proc.stderr
    rows = {r["image"]: r for r in rows_of(out)}
    assert rows["good.png"]["status"] == "ok" and squash(rows["good.png"]["text"]) == "INVOICE42"
    assert rows["cut.jpg"]["status"] == "failed" and "truncated" in rows["cut.jpg"]["error"]
    again = run_tool("extract_info", *args)
    assert again.returncode == 3 and "skipped 1 already done, 1 failed before" in again.stdout
    (images / "cut.jpg").write_bytes(data)  # repaired: new bytes, a new image to read
    fixed = run_tool("extract_info", *args)
    assert fixed.returncode == 0, fixed.stderr
    rows = rows_of(out)
    assert [r["status"] for r in rows if r["image"] == "cut.jpg"] == ["failed", "ok"]
    # the failed line of the old bytes stays as a record; no image of this run has them, so nothing is asked again
    retried = run_tool("extract_info", *args, "--retry_failed")
    assert retried.returncode == 0 and retried.stdout.startswith("0 images"), retried.stdout
