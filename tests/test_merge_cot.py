import json
from pathlib import Path

import pytest

from conftest import call_tool, run_tool
from mire_factory.answers import extract_answer
from mire_factory.convert import convert
from mire_factory.cot import fit_answer, merge_cot, qwen2_token_counter, sentences
from mire_factory.dataset_info import COT_LAYOUT_KEY
from mire_factory.io import MireInputError
from mire_factory.prompt_variants import get_prompt_variant
from mire_factory.prompts import LABEL_KEY, REASON_KEY, REASON_QUESTION, cot_user_suffix
from mire_factory.reasons import ReasonRecord
from mire_factory.taxonomy import LABELS
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


# ---------------------------------------------------------------- layout second_turn: the reason as a second exchange


@pytest.fixture(scope="module")
def converted_plain(synthetic_train, tmp_path_factory):
    """The same records as `converted`, with the label prompt variant plain (the same ids)."""
    out = tmp_path_factory.mktemp("plain_data")
    convert(*synthetic_train, out, val_size=0)
    return out / "mire_train.json"


def test_second_turn_rows_budget_and_registration(converted_plain, reasons, tmp_path, tokenizer):
    first, second, plan = reasons
    out = tmp_path / "elsewhere" / "mire_train_reason.json"
    proc = call_tool("merge_cot", "--layout", "second_turn", "--dataset_file", converted_plain, "--reasons_file", first,
                     "--reasons_file", second, "--output_file", out)
    assert proc.returncode == 0, proc.stderr
    rows = {r["id"]: r for r in json.loads(converted_plain.read_text(encoding="utf-8"))}
    merged = json.loads(out.read_text(encoding="utf-8"))
    kinds = [plan[r["id"]] for r in merged]
    assert sorted(set(kinds)) == ["endless", "long", "short"]  # the same records as the inline layout keeps
    for row in merged:
        src, kind = rows[row["id"]], plan[row["id"]]
        gold = src["messages"][1]["content"]
        assert gold in LABELS["image"] + LABELS["dialogue"]  # plain: the bare label
        roles = [m["role"] for m in row["messages"]]
        contents = [m["content"] for m in row["messages"]]
        # the first exchange is the record's as convert wrote it: its user turn unchanged, the bare label
        assert contents[:2] == [src["messages"][0]["content"], gold]
        if kind == "endless":  # no whole sentence fits: the label alone, no second exchange
            assert roles == ["user", "assistant"]
            continue
        assert roles == ["user", "assistant", "user", "assistant"]
        assert contents[2] == REASON_QUESTION and REASON_QUESTION not in contents[0]
        reason = contents[3]
        assert len(tokenizer.encode(reason, add_special_tokens=False)) + 1 <= 100
        assert "{" not in reason and LABEL_KEY not in reason  # the reason alone, not CoT JSON
        if kind == "short":
            assert reason == "用户问的是" + gold + "。"
        else:  # long: shortened at a sentence boundary, from the first file only
            assert reason and reason == SENTENCE * (len(reason) // len(SENTENCE)) and reason != SENTENCE * 12
        for path, orig in zip(row["images"], src["images"], strict=True):
            assert (out.parent / path).resolve() == (converted_plain.parent / orig).resolve()
    assert "label then the reason as a second turn" in proc.stdout
    assert f"shortened at a sentence boundary: {kinds.count('long')}, label only: {kinds.count('endless')}" \
        in proc.stdout
    entry = json.loads((out.parent / "dataset_info.json").read_text(encoding="utf-8"))["mire_train_reason"]
    # what inference reads: the first exchange's variant (label answers); the layout says what the rows are
    assert entry["mire_prompt_variant"] == "plain" and entry[COT_LAYOUT_KEY] == "second_turn"


def test_second_turn_keeps_label_only_records_as_one_exchange(converted_plain, reasons, tmp_path, count_tokens):
    first, _, plan = reasons
    report = merge_cot(converted_plain, [first], tmp_path / "r.json", keep_mismatched=True, keep_unexplained=True,
                       count_tokens=count_tokens, max_output_tokens=30, layout="second_turn")
    merged = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert len(merged) == len(plan) == report.written
    exchanges = {row["id"]: len(row["messages"]) // 2 for row in merged}
    assert {exchanges[rid] for rid, kind in plan.items() if kind in ("endless", "failed", "absent")} == {1}
    assert {exchanges[rid] for rid, kind in plan.items() if kind in ("short", "mismatch")} == {2}
    assert report.label_only == sum(n == 1 for n in exchanges.values())
    assert 0 < report.max_tokens_seen <= 30
    assert all(count_tokens(row["messages"][3]["content"]) <= 30 for row in merged if len(row["messages"]) == 4)
    with pytest.raises(MireInputError, match="below the label-only answer"):
        merge_cot(converted_plain, [first], tmp_path / "x" / "r.json", max_output_tokens=2, count_tokens=count_tokens,
                  layout="second_turn")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("case", ["cot_variant", "already_merged", "bad_reasons", "unknown_layout"])
def test_second_turn_bad_input_exits_2_and_writes_nothing(case, converted, converted_plain, reasons, tmp_path):
    first, _, _ = reasons
    dataset, layout = converted_plain, "second_turn"
    if case == "cot_variant":  # CoT user turns ask for JSON: the bare label would not answer them
        dataset = converted
    elif case == "already_merged":
        done = tmp_path / "done" / "merged.json"
        assert call_tool("merge_cot", "--layout", "second_turn", "--dataset_file", converted_plain, "--reasons_file",
                         first, "--output_file", done).returncode == 0
        dataset = done
    elif case == "bad_reasons":
        first = tmp_path / "r.jsonl"
        first.write_text('{"id": "x", "mode": 2, "model": "m", "status": "ok", "reason": 3}\n', encoding="utf-8")
    elif case == "unknown_layout":
        layout = "third_turn"
    out = tmp_path / "out" / "reason.json"
    proc = call_tool("merge_cot", "--layout", layout, "--dataset_file", dataset, "--reasons_file", first,
                     "--output_file", out)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in proc.stderr
    if case == "cot_variant":
        assert str(dataset) in lines[0] and "--prompt_variant plain or screenshot_text" in lines[0]
    elif case == "already_merged":
        assert str(dataset) in lines[0] and "already merged" in lines[0]
    elif case == "bad_reasons":
        assert str(first) in lines[0] and "reason" in lines[0]
    else:
        assert "--layout" in lines[0] and "invalid choice" in lines[0] and "second_turn" in lines[0]
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_second_turn_on_the_real_sample(mire_sample, tmp_path):
    """The 24 real records: converted plain, a reason per record (one teacher label wrong), merged second_turn by
    the command line; rows and registration as LLaMA-Factory will read them."""
    from mire_factory.records import read_mire_file

    data = tmp_path / "data"
    assert run_tool("convert", "--input_file", mire_sample / "train_sample.json", "--image_dir",
                    mire_sample / "images", "--output_dir", data, "--val_size", "0", "--quick").returncode == 0
    records = read_mire_file(mire_sample / "train_sample.json", mire_sample / "images", decode_images=False).records
    wrong = records[0].id
    lines = []
    for r in records:
        label = r.output if r.id != wrong else next(x for x in LABELS[r.task] if x != r.output)
        lines.append({"id": r.id, "mode": 3, "model": "t", "status": "ok", "label": label, "gold": r.output,
                      "reason": f"对话和截图都指向「{label}」。第二句理由。"})
    reasons = write_reasons(tmp_path / "reasons.jsonl", lines)
    proc = run_tool("merge_cot", "--layout", "second_turn", "--dataset_file", data / "mire_train.json",
                    "--reasons_file", reasons, "--output_file", data / "mire_train_reason.json")
    assert proc.returncode == 0, proc.stderr
    merged = json.loads((data / "mire_train_reason.json").read_text(encoding="utf-8"))
    source = {row["id"]: row for row in json.loads((data / "mire_train.json").read_text(encoding="utf-8"))}
    assert [row["id"] for row in merged] == [r.id for r in records if r.id != wrong]
    for row in merged:
        src, gold = source[row["id"]], next(r.output for r in records if r.id == row["id"])
        assert row["messages"] == [*src["messages"], {"role": "user", "content": REASON_QUESTION},
                                   {"role": "assistant", "content": f"对话和截图都指向「{gold}」。第二句理由。"}]
        assert row["images"] == src["images"] and all((data / p).is_file() for p in row["images"])
    assert "teacher label differs from gold: 1 (left out)" in proc.stdout and wrong in proc.stdout
    from mire_factory.sharegpt import read_sharegpt

    assert len(read_sharegpt("mire_train", data)) == len(records)  # the source untouched, still single-turn
