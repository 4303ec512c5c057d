import json
from pathlib import Path

import pytest

from conftest import run_tool
from mire_factory.answers import extract_answer
from mire_factory.convert import convert
from mire_factory.cot import fit_answer, merge_cot, qwen2_token_counter, sentences
from mire_factory.io import MireInputError
from mire_factory.prompt_variants import get_prompt_variant
from mire_factory.prompts import LABEL_KEY, REASON_KEY, cot_user_suffix
from mire_factory.reasons import ReasonRecord
from mire_factory.tiny_model import load_qwen2_tokenizer

SENTENCE = "截图里可以看到用户在询问商品的具体情况，客服的回复没有解决问题。"


@pytest.fixture(scope="module")
def count_tokens():
    return qwen2_token_counter()


@pytest.fixture(scope="module")
def tokenizer():
    return load_qwen2_tokenizer()


@pytest.fixture(scope="module")
def converted(synthetic_train, tmp_path_factory):
    out = tmp_path_factory.mktemp("cot_data")
    convert(*synthetic_train, out, val_size=0, prompt_variant="cot")
    return out / "mire_train.json"


def _gold(row):
    return extract_answer(row["messages"][1]["content"])


def write_reasons(path, rows):
    path.write_text("".join(ReasonRecord(**row).to_json() + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reasons(converted, tmp_path_factory):
    """Per record, by position: short, long (must be shortened), one endless sentence (label only), a wrong
    teacher label, a failed call, no line at all."""
    rows = json.loads(converted.read_text(encoding="utf-8"))
    first, second, plan = [], [], {}
    for k, row in enumerate(rows):
        kind = ["short", "long", "endless", "mismatch", "failed", "absent"][k % 6]
        plan[row["id"]] = kind
        base = {"id": row["id"], "mode": 2, "model": "teacher", "status": "ok", "label": _gold(row), "gold": _gold(row)}
        if kind == "short":
            first.append({**base, "reason": "用户问的是" + _gold(row) + "。"})
        elif kind == "long":
            first.append({**base, "reason": SENTENCE * 12})
            second.append({**base, "reason": "第二个文件的理由不会被用上。"})
        elif kind == "endless":
            first.append({**base, "reason": "理由" * 200})
        elif kind == "mismatch":
            wrong = "商品头图" if _gold(row) != "商品头图" else "退款页面"
            first.append({**base, "label": wrong, "reason": "我认为是" + wrong + "。"})
        elif kind == "failed":
            first.append({**base, "status": "failed", "reason": None, "label": None, "error": "timeout"})
    root = tmp_path_factory.mktemp("reasons")
    return write_reasons(root / "a.jsonl", first), write_reasons(root / "b.jsonl", second), plan


def test_sentences_keep_punctuation():
    assert sentences("甲。乙！丙?丁") == ["甲。", "乙！", "丙?", "丁"]
    assert "".join(sentences(SENTENCE * 3)) == SENTENCE * 3


def test_fit_answer_modes(count_tokens):
    answer, how = fit_answer("很短。", "气泡", count_tokens, 100)
    assert how == "full" and json.loads(answer) == {REASON_KEY: "很短。", LABEL_KEY: "气泡"}
    answer, how = fit_answer(SENTENCE * 12, "气泡", count_tokens, 100)
    reason = json.loads(answer)[REASON_KEY]
    assert how == "shortened" and count_tokens(answer) <= 100 and reason and SENTENCE.startswith(reason[:10])
    assert reason == SENTENCE * (len(reason) // len(SENTENCE))  # whole sentences only
    assert count_tokens(fit_answer(SENTENCE * (len(reason) // len(SENTENCE) + 1), "气泡", count_tokens, 10**6)[0]) > 100
    answer, how = fit_answer("理由" * 200, "气泡", count_tokens, 100)
    assert how == "label_only" and json.loads(answer) == {REASON_KEY: "", LABEL_KEY: "气泡"}
    first = json.loads(fit_answer("短。", "气泡", count_tokens, 100, get_prompt_variant("cot_label_first"))[0])
    assert list(first) == [LABEL_KEY, REASON_KEY]


def test_merge_rules_and_budget(converted, reasons, tmp_path, tokenizer):
    first, second, plan = reasons
    out = tmp_path / "elsewhere" / "mire_train_cot.json"  # another folder: image paths are rebased
    proc = run_tool("merge_cot", "--dataset_file", converted, "--reasons_file", first, "--reasons_file", second,
                    "--output_file", out)
    assert proc.returncode == 0, proc.stderr
    rows = {r["id"]: r for r in json.loads(converted.read_text(encoding="utf-8"))}
    merged = json.loads(out.read_text(encoding="utf-8"))
    kinds = [plan[r["id"]] for r in merged]
    assert sorted(set(kinds)) == ["endless", "long", "short"]
    assert len(merged) == sum(k in ("short", "long", "endless") for k in plan.values())
    for row in merged:
        src = rows[row["id"]]
        answer = row["messages"][1]["content"]
        n_tokens = len(tokenizer.encode(answer, add_special_tokens=False)) + 1  # + <|im_end|>
        assert n_tokens <= 100, (answer, n_tokens)
        parsed = json.loads(answer)
        assert list(parsed) == [REASON_KEY, LABEL_KEY] and parsed[LABEL_KEY] == _gold(src)
        kind = plan[row["id"]]
        if kind == "long":
            assert parsed[REASON_KEY] and parsed[REASON_KEY] != SENTENCE * 12 and "第二个文件" not in answer
        if kind == "endless":
            assert parsed[REASON_KEY] == ""
        task = "dialogue" if "多轮对话" in src["messages"][0]["content"] else "image"
        assert row["messages"][0]["content"] == src["messages"][0]["content"]  # as convert wrote it for every split
        assert row["messages"][0]["content"].endswith(cot_user_suffix(task))
        assert len(row["images"]) == len(src["images"])
        for path, orig in zip(row["images"], src["images"], strict=True):
            assert (out.parent / path).resolve() == (converted.parent / orig).resolve()
    n_long = kinds.count("long")
    assert f"shortened at a sentence boundary: {n_long}, label only: {kinds.count('endless')}" in proc.stdout
    mismatched = [rid for rid, k in plan.items() if k == "mismatch"]
    assert f"teacher label differs from gold: {len(mismatched)} (left out)" in proc.stdout
    assert all(rid in proc.stdout for rid in mismatched)
    info = json.loads((out.parent / "dataset_info.json").read_text(encoding="utf-8"))
    assert info["mire_train_cot"]["file_name"] == "mire_train_cot.json"
    assert info["mire_train_cot"]["mire_prompt_variant"] == "cot"


def test_keep_flags_and_label_first(synthetic_train, reasons, tmp_path, count_tokens):
    first, _, plan = reasons
    convert(*synthetic_train, tmp_path / "first", val_size=0, prompt_variant="cot_label_first")
    report = merge_cot(tmp_path / "first" / "mire_train.json", [first], tmp_path / "cot.json", keep_mismatched=True,
                       keep_unexplained=True, count_tokens=count_tokens, max_output_tokens=60)
    merged = json.loads((tmp_path / "cot.json").read_text(encoding="utf-8"))
    assert len(merged) == len(plan) == report.written
    assert report.max_tokens_seen <= 60
    assert report.label_only == sum(k in ("endless", "failed", "absent") for k in plan.values())
    for row in merged:
        parsed = json.loads(row["messages"][1]["content"])
        assert list(parsed) == [LABEL_KEY, REASON_KEY]
        assert count_tokens(row["messages"][1]["content"]) <= 60
    assert "dataset_info.json" in {p.name for p in tmp_path.iterdir()}


def test_budget_below_label_only_is_an_input_error(converted, reasons, tmp_path, count_tokens):
    with pytest.raises(MireInputError, match="below the label-only answer"):
        merge_cot(converted, [reasons[0]], tmp_path / "cot.json", max_output_tokens=5, count_tokens=count_tokens)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("case", ["bad_status", "broken_json", "test_file", "plain_variant", "unregistered"])
def test_bad_input_exits_2_and_writes_nothing(case, converted, reasons, tmp_path, synthetic_train):
    first, _, _ = reasons
    dataset = converted
    if case == "bad_status":
        first = write_reasons(tmp_path / "r.jsonl", [])
        first.write_text('{"id": "x", "mode": 2, "model": "m", "status": "maybe"}\n', encoding="utf-8")
    elif case == "broken_json":
        first = tmp_path / "r.jsonl"
        first.write_text('{"id": "x", "mode": 2,\n', encoding="utf-8")
    elif case == "test_file":
        rows = json.loads(converted.read_text(encoding="utf-8"))
        rows[3]["messages"][1]["content"] = ""
        dataset = tmp_path / "test.json"
        dataset.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    elif case == "plain_variant":  # user turns without the definitions: the test file would not match training
        convert(*synthetic_train, tmp_path / "plain", val_size=0)
        dataset = tmp_path / "plain" / "mire_train.json"
    elif case == "unregistered":
        dataset = tmp_path / "copy.json"
        dataset.write_bytes(converted.read_bytes())
    out = tmp_path / "out" / "cot.json"
    proc = run_tool("merge_cot", "--dataset_file", dataset, "--reasons_file", first, "--output_file", out)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error:") and "Traceback" not in proc.stderr
    if case in ("plain_variant", "unregistered"):
        assert "--prompt_variant cot" in proc.stderr and str(dataset) in proc.stderr
    assert not out.parent.exists() or not any(Path(out.parent).iterdir())
