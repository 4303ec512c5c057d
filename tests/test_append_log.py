"""The one resumable append-only JSONL log (append_log.AppendLog) behind distill's reasons, extract_info's and
generate's info files and vllm_infer's predictions: cut-last-line repair, key dedup, refusals, one writer."""

import json

import pytest

from mire_factory.distill import ReasonsLog
from mire_factory.image_info import InfoLog
from mire_factory.infer.output import PredictionsLog
from mire_factory.io import MireInputError, lock_path
from mire_factory.reasons import ReasonRecord


def rows_of(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_a_cut_last_line_is_repaired_only_when_asked(tmp_path):
    path = tmp_path / "p.jsonl"
    with PredictionsLog(path) as log:
        log.write([{"id": "a", "predict": "x"}, {"id": "b", "predict": "y"}])
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"id": "c", "pred')  # what a kill in the middle of a write leaves
    log = PredictionsLog(path)
    assert [r["id"] for r in log.load(repair=False)] == ["a", "b"] and path.read_bytes().endswith(b'"pred')
    assert [r["id"] for r in log.load()] == ["a", "b"] and log.repaired_bytes == len(b'{"id": "c", "pred')
    assert path.read_bytes() == whole
    with PredictionsLog(path) as log:  # appending after the repair starts on a line of its own
        log.append({"id": "c", "predict": "z"})
    assert [r["id"] for r in rows_of(path)] == ["a", "b", "c"]


def test_the_latest_line_of_a_key_wins(tmp_path):
    path = tmp_path / "p.jsonl"
    with PredictionsLog(path) as log:
        log.write([{"id": "a", "error": "image"}, {"id": "b", "predict": "1"}, {"id": "a", "predict": "2"}])
    done = PredictionsLog(path).done()
    assert list(done) == ["a", "b"] and done["a"] == {"id": "a", "predict": "2"}
    reasons = ReasonsLog(tmp_path / "r.jsonl")
    first = ReasonRecord(id="a", mode=1, model="m", status="failed", error="x")
    again = ReasonRecord(id="a", mode=1, model="m", status="ok", reason="r", label="l")
    other = ReasonRecord(id="a", mode=2, model="m", status="ok")
    assert reasons.latest([first, other, again]) == {("a", 1, "m"): again, ("a", 2, "m"): other}


def test_dropping_lines_keeps_the_others_byte_for_byte(tmp_path):
    path = tmp_path / "r.jsonl"
    lines = [ReasonRecord(id=i, mode=1, model="m", status=s, error=None if s == "ok" else "e")
             for i, s in (("a", "ok"), ("b", "failed"), ("c", "refused"), ("b", "ok"))]
    with ReasonsLog(path) as log:
        for rec in lines:
            log.append(rec)
    before = path.read_text(encoding="utf-8").splitlines(keepends=True)
    assert ReasonsLog(path).drop_keys({("b", 1, "m"), ("c", 1, "m")}) == 1  # only the failed line of b
    assert path.read_text(encoding="utf-8") == "".join(before[:1] + before[2:])
    assert ReasonsLog(path).drop_keys(set()) == 0


def test_a_broken_line_of_ours_names_its_record_and_a_foreign_file_is_refused(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b\\"q", "predict": \n{"id": "c"}\n', encoding="utf-8")
    with pytest.raises(MireInputError, match="line 2: record 'b\"q': not valid JSON .*fix or remove the line"):
        PredictionsLog(path).load()
    path.write_text('{"image": "x.png", "sha256": "0"}\n', encoding="utf-8")
    with pytest.raises(MireInputError, match="not a predictions file of tools.vllm_infer .*field 'id': missing"):
        PredictionsLog(path).load()
    path.write_text('[{"id": "a"},\n', encoding="utf-8")
    with pytest.raises(MireInputError, match=r"not a predictions file .*line 1: not valid JSON"):
        PredictionsLog(path).load()
    path.write_bytes(b'{"id": "a"}\n{"id": "\xff"}\n')
    with pytest.raises(MireInputError, match="not UTF-8 text at byte 20"):
        PredictionsLog(path).load()
    assert path.read_bytes() == b'{"id": "a"}\n{"id": "\xff"}\n'


def test_a_second_writer_is_refused_and_a_foreign_file_gets_no_lock_file(tmp_path):
    path = tmp_path / "info.jsonl"
    with InfoLog(path, writer="tools.generate").resume() as rows:
        assert rows == []
        with pytest.raises(MireInputError, match="another tools.generate is writing it"), \
                InfoLog(path, writer="tools.generate").resume():
            pass
    with InfoLog(path).resume():  # released with the run
        pass
    foreign = tmp_path / "train.json"
    foreign.write_text('[{"id": "a"}]', encoding="utf-8")
    with pytest.raises(MireInputError, match="not an info file"), InfoLog(foreign).resume():
        pass
    assert not lock_path(foreign).exists()
    refused = tmp_path / "other.jsonl"
    refused.write_text("", encoding="utf-8")

    def check(rows):
        raise MireInputError("refused by the caller")

    with pytest.raises(MireInputError, match="refused by the caller"), InfoLog(refused).resume(check):
        pass
    assert not lock_path(refused).exists()
