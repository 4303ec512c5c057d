"""Corrections files: tools.analyze writes suspects and a review page; tools.convert --corrections_file applies the
accepted lines; tools.merge_cot takes a reviewed reason; the review page is driven in a real headless Chromium."""

from __future__ import annotations

import json
import re
import time
from html.parser import HTMLParser

import pytest

from conftest import run_tool
from devtools import DevTools
from mire_factory.corrections import CORRECTIONS_KEY, read_corrections
from mire_factory.prompts import REASON_QUESTION
from mire_factory.reasons import ReasonRecord
from mire_factory.records import load_records
from mire_factory.taxonomy import LABELS


def reasons_line(rec, mode, label, reason):
    return ReasonRecord(id=rec.id, mode=mode, model="T", status="ok", reason=reason, label=label, gold=rec.output,
                        task=rec.task).to_json() + "\n"


@pytest.fixture(scope="module")
def analyzed(synthetic_train, tmp_path_factory):
    """Three suspects (two image records, one dialogue with images) the teacher relabels in both modes."""
    train, images = synthetic_train
    records = load_records(train, images)
    image = [r for r in records if r.task == "image"]
    dialogue = [r for r in records if r.task == "dialogue" and r.images]
    suspects = {image[0].id: next(r.output for r in image if r.output != image[0].output),
                image[1].id: next(r.output for r in image if r.output != image[1].output),
                dialogue[0].id: next(r.output for r in dialogue if r.output != dialogue[0].output)}
    root = tmp_path_factory.mktemp("corrections")
    reasons = root / "reasons.jsonl"
    reasons.write_text("".join(reasons_line(r, mode, suspects.get(r.id, r.output), f"模式{mode}的理由 {r.id}")
                               for r in records for mode in (2, 3)), encoding="utf-8")
    out = root / "study"
    proc = run_tool("analyze", "--input_file", train, "--image_dir", images, "--reasons_file", reasons,
                    "--output_dir", out)
    assert proc.returncode == 0, proc.stderr
    return {"out": out, "train": train, "images": images, "records": {r.id: r for r in records},
            "suspects": suspects, "root": root}


class PageParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.scripts: list[tuple[dict, str]] = []
        self.srcs: list[str] = []
        self.ids: set[str] = set()
        self._script: dict | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        for key in ("src", "href"):
            if key in attrs:
                self.srcs.append(attrs[key])
        if tag == "script":
            self._script = attrs
            self.scripts.append((attrs, ""))

    def handle_data(self, data):
        if self._script is not None:
            attrs, text = self.scripts[-1]
            self.scripts[-1] = (attrs, text + data)

    def handle_endtag(self, tag):
        if tag == "script":
            self._script = None


def test_suspects_are_a_corrections_file(analyzed):
    rows = read_corrections(analyzed["out"] / "suspects.jsonl")
    assert {r.id: r.label for r in rows} == analyzed["suspects"]
    for row in rows:
        record = analyzed["records"][row.id]
        assert row.status == "suspected" and row.gold == record.output and row.source == "analyze"
        assert [e["run"] for e in row.evidence] == ["mode 2", "mode 3"]
        assert row.evidence[0]["reason"] == f"模式2的理由 {row.id}"
    report = (analyzed["out"] / "report.md").read_text(encoding="utf-8")
    assert "[review.html](review.html)" in report


def test_review_page_is_self_contained_and_carries_every_suspect(analyzed):
    text = (analyzed["out"] / "review.html").read_text(encoding="utf-8")
    page = PageParser()
    page.feed(text)
    assert {"reviewer", "save", "filter-task", "filter-class", "filter-status", "mire-data"} <= page.ids
    assert not [s for s in page.srcs if not s.startswith("data:image/jpeg;base64,")], "something loads from outside"
    assert not re.search(r"https?://", text)
    data = json.loads(next(body for attrs, body in page.scripts if attrs.get("id") == "mire-data"))
    suspects = [json.loads(line) for line in (analyzed["out"] / "suspects.jsonl").read_text("utf-8").splitlines()]
    assert [item["correction"] for item in data["items"]] == suspects
    for item in data["items"]:
        record = analyzed["records"][item["correction"]["id"]]
        assert [i["name"] for i in item["images"]] == record.images
        assert all(i["src"] and i["src"].startswith("data:image/jpeg;base64,") for i in item["images"])
        assert (item["dialogue"] != "") == (record.task == "dialogue")
    assert data["labels"] == {task: list(labels) for task, labels in LABELS.items()}
    assert len(text) < 200_000  # thumbnails, not the images


def edited(analyzed, tmp_path, status_of: dict[str, str], **fields) -> str:
    lines = []
    for line in (analyzed["out"] / "suspects.jsonl").read_text("utf-8").splitlines():
        row = json.loads(line)
        row["status"] = status_of.get(row["id"], row["status"])
        row.update(fields.get(row["id"], {}))
        lines.append(json.dumps(row, ensure_ascii=False))
    path = tmp_path / "corrections.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def converted_labels(out) -> dict[str, str]:
    labels = {}
    for name in ("mire_train", "mire_val"):
        for row in json.loads((out / f"{name}.json").read_text("utf-8")):
            labels[row["id"]] = row["messages"][-1]["content"]
    return labels


def test_convert_applies_accepted_lines_and_records_them(analyzed, tmp_path):
    accepted, rejected, suspected = list(analyzed["suspects"])
    path = edited(analyzed, tmp_path, {accepted: "accepted", rejected: "rejected"},
                  **{accepted: {"by": "alice", "why": "看图"}})
    out = tmp_path / "data"
    proc = run_tool("convert", "--input_file", analyzed["train"], "--image_dir", analyzed["images"], "--output_dir",
                    out, "--corrections_file", path, "--quick")
    assert proc.returncode == 0, proc.stderr
    assert "1 accepted applied (1 label changes, 0 reason fixes); 1 rejected and 1 suspected" in proc.stdout
    labels = converted_labels(out)
    records = analyzed["records"]
    assert labels[accepted] == analyzed["suspects"][accepted] != records[accepted].output
    assert labels[rejected] == records[rejected].output and labels[suspected] == records[suspected].output
    assert sum(labels[i] != records[i].output for i in labels) == 1
    info = json.loads((out / "dataset_info.json").read_text("utf-8"))
    applied = [row for name in ("mire_train", "mire_val") for row in info[name][CORRECTIONS_KEY]["applied"]]
    assert applied == [{"id": accepted, "from": records[accepted].output, "to": analyzed["suspects"][accepted],
                        "by": "alice", "why": "看图"}]
    assert info["mire_train"][CORRECTIONS_KEY]["file"] == str(path)


@pytest.mark.parametrize("field, value, message", [
    ("id", "no-such-record", "no record with this id in the input file"),
    ("label", "不存在的类别", "is not a label of the"),
    ("gold", "商品头图", "the correction was reviewed against another label"),
    ("status", "maybe", "expected one of suspected, accepted, rejected"),
])
def test_convert_refuses_a_bad_line_and_writes_nothing(analyzed, tmp_path, field, value, message):
    first = next(iter(analyzed["suspects"]))
    if field == "gold" and analyzed["records"][first].output == value:
        value = "支付页面"
    path = edited(analyzed, tmp_path, {first: "accepted"}, **{first: {field: value}})
    out = tmp_path / "data"
    proc = run_tool("convert", "--input_file", analyzed["train"], "--image_dir", analyzed["images"], "--output_dir",
                    out, "--corrections_file", path, "--quick")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    rid = value if field == "id" else first
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"error: {path}: record {rid!r}: field '{field}': ") and message in lines[0], lines[0]
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("layout", ["inline", "second_turn"])
def test_merge_cot_takes_the_reviewed_reason(layout, analyzed, tmp_path):
    first = next(iter(analyzed["suspects"]))
    reason = "复核后的理由：截图显示的是另一个页面。"
    path = edited(analyzed, tmp_path, {first: "accepted"}, **{first: {"reason": reason}})
    out = tmp_path / "data"
    run_tool("convert", "--input_file", analyzed["train"], "--image_dir", analyzed["images"], "--output_dir", out,
             "--corrections_file", path, "--quick", "--prompt_variant", "cot" if layout == "inline" else "plain",
             "--val_size", "0", check=True)
    # the teacher's reasons: its mode-2 line for the corrected record names the new label too, but comes second
    proc = run_tool("merge_cot", "--layout", layout, "--dataset_file", out / "mire_train.json", "--reasons_file",
                    analyzed["root"] / "reasons.jsonl", "--output_file", out / "mire_train_cot.json", check=True)
    assert "teacher label differs from gold: 2" in proc.stdout  # the two suspects left unreviewed
    rows = {r["id"]: r for r in json.loads((out / "mire_train_cot.json").read_text("utf-8"))}
    if layout == "inline":
        answer = json.loads(rows[first]["messages"][1]["content"])
        assert answer == {"理由": reason, "所属类别": analyzed["suspects"][first]}
    else:  # the corrected label, then the reviewed reason as the second turn
        assert [m["content"] for m in rows[first]["messages"][1:]] == [analyzed["suspects"][first], REASON_QUESTION,
                                                                      reason]


@pytest.fixture
def browser(tmp_path):
    profile = tmp_path / "profile"
    profile.mkdir()
    session = DevTools(profile)
    yield session
    session.close()


@pytest.mark.browser
def test_a_reviewer_accepts_rejects_and_saves_in_chromium(analyzed, browser, tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser.send("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}, browser=True)
    browser.open((analyzed["out"] / "review.html").as_uri())
    suspects = analyzed["suspects"]
    records = analyzed["records"]
    first, second, third = list(suspects)  # two image records, then a dialogue with images
    in_file = [c.id for c in read_corrections(analyzed["out"] / "suspects.jsonl")]
    assert browser.js("[...document.querySelectorAll('section.suspect')].map(s => s.dataset.id)") == in_file
    # every thumbnail decoded by the browser
    assert browser.js("[...document.querySelectorAll('.thumbs img')].every(i => i.complete && i.naturalWidth > 0)")
    assert browser.js("document.querySelectorAll('.thumbs img').length") == sum(len(records[i].images) for i in suspects)
    # the teacher's reasons per mode are on the card
    assert f"模式3的理由 {third}" in browser.js(f"document.querySelector('[data-id=\"{third}\"] table').textContent")

    # filter by gold class: only that class's cards stay visible
    browser.choose("#filter-class", records[first].output)
    visible = browser.js("[...document.querySelectorAll('section.suspect')].filter(s => s.style.display !== 'none')"
                         ".map(s => s.dataset.id)")
    assert visible == [i for i in in_file if records[i].output == records[first].output]
    browser.choose("#filter-class", "")
    browser.choose("#filter-task", "dialogue")
    assert browser.js("[...document.querySelectorAll('section.suspect')].filter(s => s.style.display !== 'none')"
                      ".map(s => s.dataset.id)") == [third]
    browser.choose("#filter-task", "")

    browser.type_into("#reviewer", "审核员甲")
    # accept the first with another label than proposed, a reason fix and a note; reject the second
    other = next(label for label in browser.js(f"[...document.querySelectorAll('[data-id=\"{first}\"] select.label "
                                               "option')].map(o => o.value)")
                 if label not in (suspects[first], records[first].output))
    browser.choose(f'[data-id="{first}"] select.label', other)
    browser.type_into(f'[data-id="{first}"] textarea.reason', "复核：这是另一个页面。")
    browser.type_into(f'[data-id="{first}"] input.why', "看截图")
    browser.click(f'[data-id="{first}"] button.accept')
    browser.click(f'[data-id="{second}"] button.reject')
    assert browser.js(f"document.querySelector('[data-id=\"{first}\"]').dataset.status") == "accepted"
    assert "accepted 1, rejected 1" in browser.js("document.getElementById('counts').textContent")
    browser.click("#save")

    saved = downloads / "corrections.jsonl"
    deadline = time.monotonic() + 30
    while not saved.is_file() or any(downloads.glob("*.crdownload")):
        assert time.monotonic() < deadline, f"no download in {downloads}: {list(downloads.iterdir())}"
        time.sleep(0.1)
    rows = {c.id: c for c in read_corrections(saved)}
    assert list(rows) == in_file
    assert (rows[first].status, rows[first].label, rows[first].reason, rows[first].by, rows[first].why) == (
        "accepted", other, "复核：这是另一个页面。", "审核员甲", "看截图")
    assert (rows[second].status, rows[second].by) == ("rejected", "审核员甲")
    assert (rows[third].status, rows[third].by) == ("suspected", "tools.analyze")
    assert all(rows[i].gold == records[i].output for i in suspects)

    out = tmp_path / "data"
    proc = run_tool("convert", "--input_file", analyzed["train"], "--image_dir", analyzed["images"], "--output_dir",
                    out, "--corrections_file", saved, "--quick", "--val_size", "0", check=True)
    assert "1 accepted applied (1 label changes, 1 reason fixes)" in proc.stdout
    labels = {r["id"]: r["messages"][-1]["content"] for r in json.loads((out / "mire_train.json").read_text("utf-8"))}
    assert labels[first] == other
    assert labels[second] == records[second].output and labels[third] == records[third].output
