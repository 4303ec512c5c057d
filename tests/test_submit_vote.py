"""tools.convert2submit and tools.vote: pairing by id, the official CSV layout, --fill, voting and tie-breaks."""

import json
import random

import pandas as pd
import pytest

from conftest import run_tool
from mire_factory.io import run_cli
from mire_factory.taxonomy import DIALOGUE_LABELS, IMAGE_LABELS
from mire_factory.vote import TieBreak, vote
from tools import cal_acc, convert2submit
from tools import vote as vote_tool


def _records(mire_sample):
    return json.loads((mire_sample / "train_sample.json").read_text(encoding="utf-8"))


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _run(main, capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [str(a) for a in args])
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


@pytest.fixture()
def unlabelled(mire_sample, tmp_path):
    """The 24 real records as a test file: no `output`."""
    records = [{k: v for k, v in r.items() if k != "output"} for r in _records(mire_sample)]
    path = tmp_path / "test.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def test_convert2submit_writes_the_official_layout_by_id(mire_sample, unlabelled, tmp_path):
    records = _records(mire_sample)
    rows = [{"id": r["id"], "predict": r["output"] if i % 3 else json.dumps({"理由": "r", "所属类别": r["output"]},
                                                                            ensure_ascii=False)}
            for i, r in enumerate(records)]
    random.Random(5).shuffle(rows)
    preds = _write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "submit.csv"
    proc = run_tool("convert2submit", "--test_file", unlabelled, "--prediction_file", preds, "--save_path", out)
    assert proc.returncode == 0, proc.stderr
    assert "8 parsed from CoT JSON" in proc.stdout
    assert out.read_bytes().startswith(b"\xef\xbb\xbf")  # utf-8-sig, as the official tool writes it
    df = pd.read_csv(out, encoding="utf-8-sig")
    assert list(df.columns) == ["id", "instruction", "input", "image", "predict"]
    assert list(df["id"]) == [r["id"] for r in records]  # the test file's order, whatever the prediction order
    assert list(df["predict"]) == [r["output"] for r in records]

    only = tmp_path / "only.csv"
    code = run_tool("convert2submit", "--test_file", unlabelled, "--prediction_file", preds, "--save_path", only,
                    "--columns", "id,predict").returncode
    assert code == 0
    df2 = pd.read_csv(only, encoding="utf-8-sig")
    assert list(df2.columns) == ["id", "predict"] and list(df2["predict"]) == list(df["predict"])


def test_convert2submit_fixes_invalid_labels_and_reports_them(mire_sample, unlabelled, tmp_path, capsys):
    records = _records(mire_sample)
    rows = [{"id": r["id"], "predict": r["output"][:-1] if r["output"] == "退货页面" else r["output"]} for r in records]
    rows.append(rows.pop(0))
    preds = _write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "s.csv"
    code, stdout, _ = _run(convert2submit.main, capsys, "--test_file", unlabelled, "--prediction_file", preds,
                           "--save_path", out)
    assert code == 0
    assert "1 near misses fixed" in stdout and "fixed -> [image] 退货页面: 1" in stdout
    assert "退货页面" in set(pd.read_csv(out, encoding="utf-8-sig")["predict"])


def test_convert2submit_missing_ids_exit_2_unless_filled(mire_sample, unlabelled, tmp_path, capsys):
    records = _records(mire_sample)
    dropped = [records[0]["id"], records[20]["id"]]
    rows = [{"id": r["id"], "predict": r["output"]} for r in records if r["id"] not in dropped]
    rows.append(dict(rows[3]))  # a duplicate too
    preds = _write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "s.csv"
    code, stdout, err = _run(convert2submit.main, capsys, "--test_file", unlabelled, "--prediction_file", preds,
                             "--save_path", out)
    assert code == 2 and not out.exists() and stdout == ""
    assert f"2 test ids without a prediction: {dropped[0]!r}, {dropped[1]!r}" in err
    assert f"1 ids predicted more than once: {rows[3]['id']!r}" in err

    code, stdout, err = _run(convert2submit.main, capsys, "--test_file", unlabelled, "--prediction_file", preds,
                             "--save_path", out, "--fill")
    assert code == 0, err
    assert "2 filled with the nearest label (--fill)" in stdout and "filled (missing) -> " in stdout
    assert f"filled 2 missing predictions: {dropped}" in stdout
    df = pd.read_csv(out, encoding="utf-8-sig")
    assert len(df) == 24
    filled = dict(zip(df["id"], df["predict"], strict=True))
    assert filled[dropped[0]] in DIALOGUE_LABELS and filled[dropped[1]] in IMAGE_LABELS


def test_a_test_file_with_empty_outputs_and_invalid_answers(mire_sample, tmp_path, capsys):
    """The official test-file shape ("output": "") is a test file for convert2submit and vote alike. Empty and
    unmatched answers and failed rows are written as they are (the metric scores them wrong) unless --fill; a
    record no model answers validly keeps the first file's answer in the vote."""
    records = _records(mire_sample)
    test_file = tmp_path / "test.json"
    test_file.write_text(json.dumps([{**r, "output": ""} for r in records], ensure_ascii=False), encoding="utf-8")
    rows = [{"id": r["id"], "predict": r["output"]} for r in records]
    rows[0]["predict"] = ""
    rows[1]["predict"] = "我不确定"
    rows[2] = {"id": records[2]["id"], "predict": "", "error": "cannot read an image of the record (OSError: x)"}
    preds = _write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "s.csv"
    code, stdout, err = _run(convert2submit.main, capsys, "--test_file", test_file, "--prediction_file", preds,
                             "--save_path", out)
    assert code == 0, err
    assert "3 left invalid (empty 1, unmatched 1, failed 1)" in stdout
    assert f"1 predictions failed at inference, e.g. {records[2]['id']}: cannot read an image" in stdout
    written = pd.read_csv(out, encoding="utf-8-sig", keep_default_na=False)["predict"].tolist()
    assert written[:3] == ["", "我不确定", ""] and written[3:] == [r["output"] for r in records[3:]]
    code, stdout, _ = _run(convert2submit.main, capsys, "--test_file", test_file, "--prediction_file", preds,
                           "--save_path", out, "--fill")
    assert code == 0 and "3 filled with the nearest label (--fill)" in stdout
    tasks = ["image" if "识图专家" in r["instruction"] else "dialogue" for r in records]
    filled = pd.read_csv(out, encoding="utf-8-sig")["predict"].tolist()
    for label, task in zip(filled[:3], tasks, strict=False):
        assert label in (IMAGE_LABELS if task == "image" else DIALOGUE_LABELS)

    # vote: invalid answers cast no vote
    other = _write_jsonl(tmp_path / "q.jsonl", [{"id": r["id"], "predict": r["output"]} for r in records[:1]]
                         + [{"id": r["id"], "predict": ""} for r in records[1:]])
    code, stdout, err = _run(vote_tool.main, capsys, "--prediction_file", preds, "--prediction_file", other,
                             "--test_file", test_file, "--save_path", tmp_path / "v.jsonl")
    assert code == 0, err
    voted = [json.loads(line)["predict"] for line in (tmp_path / "v.jsonl").read_text(encoding="utf-8").splitlines()]
    assert voted[0] == records[0]["output"]  # only the second file answered it
    assert voted[1:3] == ["我不确定", ""]  # nobody answered validly: the first file's answer, invalid
    assert voted[3:] == [r["output"] for r in records[3:]]
    assert "2 records have no valid answer in any file" in stdout


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty", "no predictions (empty file)"),
        ("unknown_task", "field 'instruction': cannot tell the task"),
        ("not_a_list", "expected a JSON list of records"),
        ("missing_prediction_file", "file not found"),
    ],
)
def test_convert2submit_bad_input_exits_2(mire_sample, unlabelled, tmp_path, capsys, case, message):
    preds = _write_jsonl(tmp_path / "p.jsonl", [{"id": r["id"], "predict": r["output"]} for r in _records(mire_sample)])
    if case == "empty":
        preds.write_text("\n", encoding="utf-8")
    elif case == "unknown_task":
        records = json.loads(unlabelled.read_text(encoding="utf-8"))
        records[4]["instruction"] = "随便一段文字"
        unlabelled.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    elif case == "not_a_list":
        unlabelled.write_text('{"id": 1}', encoding="utf-8")
    elif case == "missing_prediction_file":
        preds = tmp_path / "nope.jsonl"
    out = tmp_path / "s.csv"
    code, stdout, err = _run(convert2submit.main, capsys, "--test_file", unlabelled, "--prediction_file", preds,
                             "--save_path", out)
    assert code == 2 and message in err, err
    assert not out.exists() and not list(tmp_path.glob(".s.csv*"))


# --- voting ---------------------------------------------------------------------------------------------------------


def test_vote_majority_weights_and_tie_breaks():
    a, b, c = IMAGE_LABELS[:3]
    files = [[a, a, a, b], [a, b, b, c], [b, b, c, a]]
    result = vote(files, [1, 1, 1], TieBreak.parse("first", 3))
    assert result.labels == [a, b, a, b]  # records 3 and 4 are three-way ties: the first file's label wins
    assert result.tied == [False, False, True, True] and result.unanimous == [False] * 4
    assert result.agreement[0][1] == pytest.approx(0.25) and result.agreement[1][2] == pytest.approx(0.25)
    assert result.agreement[0][2] == 0.0 and result.agreement[2][2] == 1.0
    assert vote(files, [1, 1, 1], TieBreak.parse("model:3", 3)).labels == [a, b, c, a]
    assert vote(files, [1, 1, 3], TieBreak.parse("first", 3)).labels == [b, b, c, a]  # file 3 outweighs the others
    assert vote(files, [1, 2, 2], TieBreak.parse("weights", 3)).labels[0] == a  # a: 1 + 2 beats b: 2
    tied = vote([[a], [b]], [1, 1.5], TieBreak.parse("weights", 2))
    assert tied.labels == [b] and not tied.tied[0]
    assert vote([[a], [b]], [2, 2], TieBreak.parse("weights", 2)).labels == [a]
    assert vote([[a], [b], [b], [a]], [1, 1, 1, 3], TieBreak.parse("weights", 4)).labels == [a]
    assert vote([[a], [b], [a], [b]], [1, 3, 3, 1], TieBreak.parse("weights", 4)).labels == [b]
    with pytest.raises(ValueError, match="model:K needs K in 1..3"):
        TieBreak.parse("model:4", 3)


def _vote_inputs(mire_sample, tmp_path):
    """Three models over the 24 real records with a known per-record majority."""
    records = _records(mire_sample)
    golds = [r["output"] for r in records]
    labels_of = [IMAGE_LABELS if "识图专家" in r["instruction"] else DIALOGUE_LABELS for r in records]
    # Two different wrong labels of the record's own task.
    other = [labels[(labels.index(g) + 1) % len(labels)] for g, labels in zip(golds, labels_of, strict=True)]
    third = [labels[(labels.index(g) + 2) % len(labels)] for g, labels in zip(golds, labels_of, strict=True)]
    # Records 0-11: models 1 and 2 right, model 3 wrong. 12-17: 2 and 3 agree on a wrong label. 18-23: all right.
    m1 = golds[:12] + other[12:18] + golds[18:]
    m2 = golds[:12] + third[12:18] + golds[18:]
    m3 = other[:12] + third[12:18] + golds[18:]
    majority = golds[:12] + third[12:18] + golds[18:]
    paths = []
    for k, labels in enumerate((m1, m2, m3), start=1):
        rows = [{"id": r["id"], "predict": label} for r, label in zip(records, labels, strict=True)]
        if k == 2:  # one model in CoT format and shuffled: voting reads it like the others
            rows = [{"id": row["id"], "predict": json.dumps({"理由": "r", "所属类别": row["predict"]}, ensure_ascii=False)}
                    for row in rows]
            random.Random(1).shuffle(rows)
        paths.append(_write_jsonl(tmp_path / f"m{k}.jsonl", rows))
    return records, paths, majority


def test_vote_reproduces_a_known_majority_and_feeds_cal_acc_and_convert2submit(mire_sample, tmp_path, capsys):
    records, paths, majority = _vote_inputs(mire_sample, tmp_path)
    test_file = mire_sample / "train_sample.json"
    out, unanimous = tmp_path / "vote.jsonl", tmp_path / "unanimous.json"
    args = [a for p in paths for a in ("--prediction_file", p)]
    code, stdout, err = _run(vote_tool.main, capsys, *args, "--test_file", test_file, "--save_path", out,
                             "--unanimous_out", unanimous)
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [row["id"] for row in rows] == [r["id"] for r in records]
    assert [row["predict"] for row in rows] == majority
    assert "6/24 records unanimous, 0 ties" in stdout and "pairwise agreement" in stdout
    pseudo = json.loads(unanimous.read_text(encoding="utf-8"))
    assert [p["id"] for p in pseudo] == [r["id"] for r in records[18:]]
    assert all(p["output"] == r["output"] and p["instruction"] == r["instruction"]
               for p, r in zip(pseudo, records[18:], strict=True))

    code, stdout, _ = _run(cal_acc.main, capsys, "--test_file", test_file, "--prediction_file", out,
                           "--json_file", tmp_path / "m.json")
    assert code == 0
    assert json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))["pooled"]["accuracy"] == pytest.approx(18 / 24)
    submit = tmp_path / "s.csv"
    code, _, _ = _run(convert2submit.main, capsys, "--test_file", test_file, "--prediction_file", out,
                      "--save_path", submit)
    assert code == 0 and list(pd.read_csv(submit, encoding="utf-8-sig")["predict"]) == majority

    # Trusting model 1 on ties changes nothing here (there are none); weighting model 1 above the others does.
    code, _, _ = _run(vote_tool.main, capsys, *args, "--test_file", test_file, "--save_path", out,
                      "--weights", "3,1,1")
    assert code == 0
    m1 = [json.loads(line)["predict"] for line in paths[0].read_text(encoding="utf-8").splitlines()]
    assert [json.loads(line)["predict"] for line in out.read_text(encoding="utf-8").splitlines()] == m1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--weights", "1,1"], "--weights has 2 values for 3 prediction files"),
        (["--weights", "1,x,1"], "--weights must be comma-separated numbers"),
        (["--weights", "1,0,1"], "--weights must all be positive"),
        (["--tie_break", "model:9"], "model:K needs K in 1..3"),
        (["--tie_break", "coin"], "--tie_break must be first, weights or model:K"),
        (["drop_one"], "test ids without a prediction"),
    ],
)
def test_vote_bad_input_exits_2(mire_sample, tmp_path, capsys, extra, message):
    _, paths, _ = _vote_inputs(mire_sample, tmp_path)
    if extra == ["drop_one"]:
        lines = paths[2].read_text(encoding="utf-8").splitlines()
        paths[2].write_text("\n".join(lines[1:]) + "\n", encoding="utf-8")
        extra = []
    out = tmp_path / "vote.jsonl"
    args = [a for p in paths for a in ("--prediction_file", p)]
    code, _, err = _run(vote_tool.main, capsys, *args, "--test_file", mire_sample / "train_sample.json",
                        "--save_path", out, *extra)
    assert code == 2 and message in err, err
    assert not out.exists()
