"""tools.analyze on a reasons file built to known answers."""

from __future__ import annotations

import json

import pytest

from conftest import run_tool
from mire_factory.reasons import ReasonRecord
from mire_factory.records import load_records


def line(rec, mode, label, reason, status="ok", model="T"):
    return ReasonRecord(id=rec.id, mode=mode, model=model, status=status, reason=reason if status == "ok" else None,
                        label=label if status == "ok" else None, gold=rec.output, task=rec.task,
                        usage={"prompt_tokens": 100, "completion_tokens": len(reason or "")},
                        error=None if status == "ok" else f"{status} on purpose")


@pytest.fixture(scope="module")
def study(synthetic_train, tmp_path_factory):
    """Designed outcomes: which record is wrong in which mode is known in advance."""
    train, images = synthetic_train
    records = load_records(train, images)
    image = [r for r in records if r.task == "image"]
    dialogue = [r for r in records if r.task == "dialogue"]
    suspect, hurt, helped = image[0], dialogue[0], dialogue[1]
    half_wrong = next(r for r in image if r.output != suspect.output)
    flaky = next(r for r in image if r.output not in (suspect.output, half_wrong.output))
    wrong_label = next(r.output for r in image if r.output != suspect.output)
    wrong_dialogue = next(r.output for r in dialogue if r.output != hurt.output)
    rows = []
    for rec in records:
        m1 = m2 = m3 = rec.output
        if rec is suspect:
            m1 = m2 = m3 = wrong_label
        elif rec is half_wrong:
            m1 = suspect.output
        elif rec is hurt:
            m3 = wrong_dialogue
        elif rec is helped:
            m2 = next(r.output for r in dialogue if r.output != helped.output)
        rows.append(line(rec, 1, m1, f"自由推理的理由{rec.id}"))
        rows.append(line(rec, 2, m2, "这是一个比较长的理由，" * 8 + rec.id))
        rows.append(line(rec, 3, m3, f"短理由{rec.index}"))
    # one refused and one failed line replace the ok ones of `flaky` in mode 1 and 3
    rows = [r for r in rows if not (r.id == flaky.id and r.mode in (1, 3))]
    rows += [line(flaky, 1, None, None, status="refused"), line(flaky, 3, None, None, status="failed")]
    root = tmp_path_factory.mktemp("analyze")
    first = root / "modes12.jsonl"
    second = root / "mode3.jsonl"
    first.write_text("".join(r.to_json() + "\n" for r in rows if r.mode in (1, 2)), encoding="utf-8")
    second.write_text("".join(r.to_json() + "\n" for r in rows if r.mode == 3), encoding="utf-8")
    out = root / "study"
    proc = run_tool("analyze", "--input_file", train, "--reasons_file", first, "--reasons_file", second,
                    "--output_dir", out)
    assert proc.returncode == 0, proc.stderr
    return {"out": out, "records": records, "suspect": suspect, "half_wrong": half_wrong, "hurt": hurt,
            "helped": helped, "wrong_label": wrong_label, "train": train, "first": first}


def test_report_has_every_section(study):
    report = (study["out"] / "report.md").read_text(encoding="utf-8")
    for heading in ("# Teacher data study", "## Per class: samples and teacher errors", "### image task",
                    "### dialogue task", "## Mode 2 vs mode 3: does the length limit help or hurt?",
                    "## Classes the teacher confuses", "## Suspected label errors"):
        assert heading in report, heading
    n = len(study["records"])
    assert f"| mode 1 | {n} | {n - 1} | 1 | 0 | 0 |" in report
    assert f"| mode 3 | {n} | {n - 1} | 0 | 1 | 0 |" in report


def test_per_class_counts_and_wrong_samples(study):
    report = (study["out"] / "report.md").read_text(encoding="utf-8")
    suspect = study["suspect"]
    same_class = [r for r in study["records"] if r.output == suspect.output]
    acc = f"{(len(same_class) - 1) / len(same_class):.1%}"
    assert f"| {suspect.output} | {len(same_class)} | {acc} | {acc} | {acc} |" in report
    section = report.split(f"#### {suspect.output}: samples the teacher got wrong")[1].split("####")[0]
    for mode in (1, 2, 3):
        assert f"| mode {mode} | `{suspect.id}` | {study['wrong_label']} |" in section
    assert f"自由推理的理由{suspect.id}" in section
    half = study["half_wrong"]
    assert f"| mode 1 | `{half.id}` |" in report and f"| mode 2 | `{half.id}` |" not in report


def test_mode_2_vs_3(study):
    report = (study["out"] / "report.md").read_text(encoding="utf-8")
    section = report.split("## Mode 2 vs mode 3")[1].split("## Classes")[0]
    assert "Flipped: 1 right in mode 2 but wrong in mode 3; 1 wrong in mode 2 but right in mode 3." in section
    assert f"`{study['hurt'].id}`" in section and f"`{study['helped'].id}`" in section
    assert "**Verdict (T):**" in section and "neither helps nor hurts" in section
    rows = [r for r in section.splitlines() if r.startswith(("| 2 |", "| 3 |"))]
    mean2, mean3 = (float(r.split("|")[3]) for r in rows)
    assert mean2 > 80 > 20 > mean3
    assert (study["out"] / "reason_length_T.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_confusions_and_pngs(study):
    report = (study["out"] / "report.md").read_text(encoding="utf-8")
    for task in ("image", "dialogue"):
        png = study["out"] / f"confusion_{task}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert f"![confusion matrix](confusion_{task}.png)" in report
    a, b = sorted((study["suspect"].output, study["wrong_label"]))
    top = report.split("### image task")[-1].split("| classes confused")[1].splitlines()[2]
    times = 3 + (study["half_wrong"].output == study["wrong_label"])  # half_wrong was called the suspect's class
    assert top.startswith(f"| {a} / {b} | {times} |")


def test_trainset_error_lists_only_samples_wrong_in_every_mode(study):
    text = (study["out"] / "trainset_error.md").read_text(encoding="utf-8")
    suspect = study["suspect"]
    assert f"## {suspect.output} (image, 1)" in text
    assert f"### `{suspect.id}`" in text and f"**{study['wrong_label']}**" in text
    for other in ("half_wrong", "hurt", "helped"):
        assert study[other].id not in text
    assert text.count("### `") == 1


def test_bad_reasons_lines(study, tmp_path):
    bad = tmp_path / "bad.jsonl"
    rec = study["records"][0]
    good_line = line(rec, 1, rec.output, "r").to_json()
    # a blank line first: errors name the file's own line numbers, not the count of objects
    bad.write_text("\n" + good_line + "\n" + good_line + "\n" + json.dumps({"id": "nope", "mode": 1, "model": "T",
                                                                            "status": "ok"}) + "\n", encoding="utf-8")
    proc = run_tool("analyze", "--input_file", study["train"], "--reasons_file", bad, "--output_dir", tmp_path / "o")
    assert proc.returncode == 2
    assert f"{bad}: line 3: record {rec.id!r}: field 'id': a second line for mode 1" in proc.stderr
    assert f"{bad}: line 4: record 'nope': field 'id': not in the input file" in proc.stderr
    assert not (tmp_path / "o" / "report.md").exists()
