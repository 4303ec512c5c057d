"""The official metric (scoring.score), answer parsing and label fixing, and tools.cal_acc end to end."""

import json
import random

import pytest
from PIL import Image
from sklearn.metrics import f1_score, precision_score, recall_score

from conftest import run_tool
from mire_factory.answers import INVALID, extract_answer, read_answer, read_answers
from mire_factory.io import run_cli
from mire_factory.scoring import score
from mire_factory.taxonomy import (
    DIALOGUE_LABELS,
    IMAGE_LABELS,
    RETIRED_IMAGE_LABELS,
    build_dialogue_instruction,
    label_similarities,
)
from tools import cal_acc

A, B, C = IMAGE_LABELS[0], IMAGE_LABELS[1], IMAGE_LABELS[2]
X, Y = DIALOGUE_LABELS[0], DIALOGUE_LABELS[1]


def test_per_class_scores_match_a_hand_count():
    golds = [A, A, A, B, B, C]
    preds = [A, A, B, B, C, C]
    result = score(golds, preds, ["image"] * 6)
    # A: tp 2, fp 0, fn 1; B: tp 1, fp 1, fn 1; C: tp 1, fp 1, fn 0.
    hand = {A: (1.0, 2 / 3, 0.8, 3), B: (0.5, 0.5, 0.5, 2), C: (0.5, 1.0, 2 / 3, 1)}
    for label, (p, r, f, s) in hand.items():
        got = result["per_class"]["image"][label]
        assert got["precision"] == pytest.approx(p) and got["recall"] == pytest.approx(r)
        assert got["f1"] == pytest.approx(f) and got["support"] == s
    weighted = {m: sum(v[i] * v[3] for v in hand.values()) / 6 for i, m in enumerate(("precision", "recall", "f1"))}
    for metric, value in weighted.items():
        assert result["image"][metric] == pytest.approx(value)
    assert result["image"]["accuracy"] == pytest.approx(4 / 6)
    assert result["overall"] == result["image"] and result["dialogue"] is None
    assert list(result["per_class"]) == ["image"]


def test_overall_is_the_mean_of_the_two_tasks_not_the_pooled_figure():
    # Unbalanced: 9 image records all right, 1 dialogue record wrong.
    golds = [A] * 5 + [B] * 4 + [X]
    preds = [A] * 5 + [B] * 4 + [Y]
    tasks = ["image"] * 9 + ["dialogue"]
    result = score(golds, preds, tasks)
    assert result["image"]["f1"] == 1.0 and result["dialogue"]["f1"] == 0.0
    assert result["overall"]["f1"] == pytest.approx(0.5)
    assert result["overall"]["accuracy"] == pytest.approx(0.5)
    assert result["pooled"]["accuracy"] == pytest.approx(0.9)
    assert result["pooled"]["f1"] == pytest.approx(f1_score(golds, preds, average="weighted", zero_division=0))
    for metric in ("f1", "accuracy", "precision", "recall"):
        mean = (result["image"][metric] + result["dialogue"][metric]) / 2
        assert result["overall"][metric] == pytest.approx(mean)
    assert round((0.8648 + 0.7116) / 2, 4) == 0.7882  # the official figures combine the same way


def test_scores_equal_sklearn_on_random_two_task_data():
    rng = random.Random(7)
    tasks = [rng.choice(["image", "dialogue"]) for _ in range(300)]
    golds = [rng.choice(IMAGE_LABELS[:8] if t == "image" else DIALOGUE_LABELS[:8]) for t in tasks]
    preds = [g if rng.random() < 0.6 else rng.choice(IMAGE_LABELS[:10] if t == "image" else DIALOGUE_LABELS[:10])
             for g, t in zip(golds, tasks, strict=True)]
    result = score(golds, preds, tasks)
    for task in ("image", "dialogue"):
        g = [x for x, t in zip(golds, tasks, strict=True) if t == task]
        p = [x for x, t in zip(preds, tasks, strict=True) if t == task]
        assert result[task]["precision"] == pytest.approx(precision_score(g, p, average="weighted", zero_division=0))
        assert result[task]["recall"] == pytest.approx(recall_score(g, p, average="weighted", zero_division=0))
        assert result[task]["f1"] == pytest.approx(f1_score(g, p, average="weighted", zero_division=0))
        assert sum(c["support"] for c in result["per_class"][task].values()) == len(g)


def test_score_rejects_unusable_input():
    with pytest.raises(ValueError, match="length"):
        score([A], [A, B], ["image"])
    with pytest.raises(ValueError, match="no records"):
        score([], [], [])
    with pytest.raises(ValueError, match="unknown task"):
        score([A], [A], ["video"])


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"理由": "页面显示退款进度", "所属类别": "退款页面"}', "退款页面"),
        ('{"所属类别": "退款页面", "理由": "页面显示退款进度"}', "退款页面"),
        ('```json\n{"理由": "r", "所属类别": "支付页面"}\n```', "支付页面"),
        ('好的，结果如下：{"理由": "r", "所属类别": "支付页面"} 以上。', "支付页面"),
        ("{'理由': '单引号', '所属类别': '店铺页面'}", "店铺页面"),
        ('{"理由": "回答被截断", "所属类别": "物流页面-物流跟', "物流页面-物流跟"),
        ('{"理由": "未闭合", "所属类别": "商品头图"', "商品头图"),
        ('{"reason": "x", "label": "商品规格"}', "商品规格"),
        ('{"理由": "x", "所属类别": ["活动页面"]}', "活动页面"),
        ('{"理由": "含"引号"的理由", "所属类别": "气泡"}', "气泡"),
        ("  退款页面 \n", "退款页面"),
        ('{"理由": "只有理由"}', '{"理由": "只有理由"}'),
        (None, ""),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_near_misses_are_fixed_and_the_rest_stays_invalid_unless_filled():
    texts = [
        '{"理由": "r", "所属类别": "退款页面"}',  # CoT, valid
        "退款页",  # truncated
        '{"理由": "r", "所属类别": "物流页面-物流跟"}',  # CoT and truncated
        "「套装推荐」",  # quoted: normalized, not fixed
        "商品规格吧",  # padded dialogue answer
        "商品规各",  # one character wrong in a 4-character label: similar
        "商品规格",  # a dialogue label on an image record: invalid, not guessed within the image task
        "",  # empty
        "我也不知道",  # garbage
        None,  # no prediction (--fill only)
    ]
    tasks = ["image", "image", "image", "dialogue", "dialogue", "dialogue", "image", "image", "dialogue", "image"]
    ids = [f"r{k}" for k in range(len(texts))]
    answers, report = read_answers(texts, tasks, ids)
    assert [a.label for a in answers] == ["退款页面", "退款页面", "物流页面-物流跟踪页面", "套装推荐", "商品规格",
                                          "商品规格", None, None, None, None]
    assert [a.how for a in answers] == ["exact", "truncated", "truncated", "normalized", "contained", "similar",
                                        "other_task", "empty", "unmatched", "missing"]
    assert [a.scored for a in answers][6:] == [INVALID] * 4
    assert report.from_json == 2 and report.hows["normalized"] == 1 and report.n_fixed == 4
    assert report.fixed[("image", "退款页面")] == 1 and report.fixed[("dialogue", "商品规格")] == 2
    assert report.n_invalid == 4
    assert any("fixed -> [image] 退款页面: 1" in line for line in report.lines())
    assert "4 near misses fixed, 4 left invalid (empty 1, unmatched 1, other task 1, missing 1)" in report.lines()[0]

    filled, report = read_answers(texts, tasks, ids, fill=True)  # the old behaviour: every record gets a label
    assert [a.label for a in filled[:6]] == [a.label for a in answers[:6]]
    assert filled[6].label in IMAGE_LABELS and filled[7].label in IMAGE_LABELS and filled[9].label in IMAGE_LABELS
    assert filled[8].label in DIALOGUE_LABELS and [a.how for a in filled[6:]] == ["filled"] * 4
    assert "4 filled with the nearest label (--fill)" in report.lines()[0]


@pytest.mark.parametrize("label", [x for x in (*IMAGE_LABELS, *DIALOGUE_LABELS) if x not in RETIRED_IMAGE_LABELS])
def test_one_wrong_character_is_a_near_miss_in_labels_of_three_or_more(label):
    """The similarity threshold (answers.SIMILAR_MIN): one character replaced anywhere in a label of >= 3
    characters is read as that label, unless another label is just as near; half of a 2-character label is not."""
    task = "image" if label in IMAGE_LABELS else "dialogue"
    for k in range(len(label)):
        typo = label[:k] + "叒" + label[k + 1:]
        answer = read_answer(typo, task)
        ranked = label_similarities(typo, task)
        if len(label) >= 3 and ranked[1][1] < ranked[0][1]:
            assert answer.label == label and answer.how == "similar", (typo, answer)
        else:  # 2 characters, or as near another label (退叒页面: 退款页面 or 退货页面)
            assert answer.label is None and answer.how == "unmatched", (typo, answer)


def test_empty_answers_score_as_the_official_tool_scores_them():
    """An invalid answer is scored as a string no gold has: the figures equal scoring the raw strings, and are
    above those of guessing a default label (which also costs the default class's precision)."""
    golds = [A, A, B, B, C, C, X, Y]
    raw = [A, "", B, "", C, C, X, ""]
    tasks = ["image"] * 6 + ["dialogue"] * 2
    answers, _ = read_answers(raw, tasks, [str(k) for k in range(8)])
    scored = score(golds, [a.scored for a in answers], tasks)
    official = score(golds, raw, tasks)
    for key in ("image", "dialogue", "overall", "pooled"):
        assert scored[key] == pytest.approx(official[key])
    filled, _ = read_answers(raw, tasks, [str(k) for k in range(8)], fill=True)
    assert score(golds, [a.scored for a in filled], tasks)["overall"]["f1"] < scored["overall"]["f1"]


# --- tools.cal_acc on the 24 real records -------------------------------------------------------------------------


def _records(mire_sample):
    return json.loads((mire_sample / "train_sample.json").read_text(encoding="utf-8"))


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _cal_acc(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(cal_acc.main, [str(a) for a in args])
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def test_cal_acc_gold_predictions_score_one_everywhere(mire_sample, tmp_path):
    test_file = mire_sample / "train_sample.json"
    preds = _write_jsonl(tmp_path / "p.jsonl", [{"id": r["id"], "predict": r["output"]} for r in _records(mire_sample)])
    metrics = tmp_path / "m.json"
    proc = run_tool("cal_acc", "--test_file", test_file, "--prediction_file", preds, "--json_file", metrics,
                    "--plot_dir", tmp_path / "plots")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[0]) == {"f1": 1.0, "accuracy": 1.0, "precision": 1.0, "recall": 1.0}
    result = json.loads(metrics.read_text(encoding="utf-8"))
    assert set(result) == {"overall", "image", "dialogue", "pooled", "per_class"}
    for key in ("overall", "image", "dialogue", "pooled"):
        assert result[key] == {"f1": 1.0, "accuracy": 1.0, "precision": 1.0, "recall": 1.0}
    assert sum(c["support"] for c in result["per_class"]["image"].values()) == 12
    assert result["per_class"]["dialogue"]["反馈密封性不好"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}
    for task in ("image", "dialogue"):
        png = tmp_path / "plots" / f"confusion_{task}.png"
        with Image.open(png) as img:
            assert img.format == "PNG" and img.width > 200 and img.height > 200
            img.verify()
        csv = (tmp_path / "plots" / f"confusion_{task}.csv").read_text(encoding="utf-8-sig")
        assert len(csv.splitlines()) == 1 + (12 if task == "image" else 10)


def test_cal_acc_shuffled_predictions_with_ids_score_as_the_ordered_ones(mire_sample, tmp_path, capsys):
    records = _records(mire_sample)
    # A deterministic mix of right, wrong, CoT and invalid answers so that the scores are not trivially 1.0.
    rows = []
    for i, r in enumerate(records):
        wrong = records[(i + 2) % len(records)]["output"]
        predict = [r["output"], wrong, json.dumps({"理由": "x", "所属类别": r["output"]}, ensure_ascii=False),
                   r["output"][:-1]][i % 4]
        rows.append({"id": r["id"], "predict": predict})
    ordered = _write_jsonl(tmp_path / "ordered.jsonl", rows)
    shuffled_rows = rows[:]
    random.Random(3).shuffle(shuffled_rows)
    assert shuffled_rows != rows
    shuffled = _write_jsonl(tmp_path / "shuffled.jsonl", shuffled_rows)
    test_file = mire_sample / "train_sample.json"
    code, _, _ = _cal_acc(capsys, "--test_file", test_file, "--prediction_file", ordered, "--json_file", tmp_path / "a.json")
    assert code == 0
    code, out, _ = _cal_acc(capsys, "--test_file", test_file, "--prediction_file", shuffled,
                            "--json_file", tmp_path / "b.json")
    assert code == 0
    a = json.loads((tmp_path / "a.json").read_text(encoding="utf-8"))
    assert a == json.loads((tmp_path / "b.json").read_text(encoding="utf-8"))
    assert 0.2 < a["overall"]["accuracy"] < 1.0
    assert a["overall"]["f1"] == pytest.approx((a["image"]["f1"] + a["dialogue"]["f1"]) / 2)
    # Every record but the wrong quarter is right once CoT answers are parsed and truncated labels fixed.
    assert a["pooled"]["accuracy"] == pytest.approx(18 / 24)
    assert "6 parsed from CoT JSON" in out and "6 near misses fixed" in out

    # The official behaviour (--raw) keeps the CoT and truncated strings, and they count as wrong.
    code, out, _ = _cal_acc(capsys, "--test_file", test_file, "--prediction_file", shuffled, "--raw",
                            "--json_file", tmp_path / "raw.json")
    assert code == 0 and "raw strings" in out
    raw = json.loads((tmp_path / "raw.json").read_text(encoding="utf-8"))
    assert raw["pooled"]["accuracy"] == pytest.approx(6 / 24)
    golds = [r["output"] for r in records]
    preds = [row["predict"] for row in rows]
    image = [i for i, r in enumerate(records) if "识图专家" in r["instruction"]]
    dialogue = [i for i in range(len(records)) if i not in image]
    expected = sum(f1_score([golds[i] for i in idx], [preds[i] for i in idx], average="weighted", zero_division=0)
                   for idx in (image, dialogue)) / 2
    assert raw["overall"]["f1"] == pytest.approx(expected)


def test_cal_acc_reads_llamafactory_predictions_by_position(mire_sample, tmp_path, capsys):
    records = _records(mire_sample)
    rows = [{"prompt": "system\nYou are a helpful assistant.\nuser\n" + r["instruction"], "predict": r["output"],
             "label": r["output"]} for r in records]
    preds = _write_jsonl(tmp_path / "generated_predictions.jsonl", rows)
    code, out, err = _cal_acc(capsys, "--test_file", mire_sample / "train_sample.json", "--prediction_file", preds)
    assert code == 2 and "no ids" in err and "--by_position" in err  # never paired by position unasked
    code, out, err = _cal_acc(capsys, "--test_file", mire_sample / "train_sample.json", "--prediction_file", preds,
                              "--by_position")
    assert code == 0, err
    assert "paired 24 predictions with the test records by position" in out
    assert json.loads(out.splitlines()[0])["f1"] == 1.0

    # Lines out of order are caught by the prompt's task, its conversation or the label, not silently scored.
    for i, j, why in [(0, 23, "a image prompt paired by position with dialogue record"),
                      (0, 2, "field 'prompt': another conversation"),
                      (12, 13, "field 'label'")]:
        swapped = rows[:]
        swapped[i], swapped[j] = swapped[j], swapped[i]
        if i == 0 and j == 2:  # unlabelled, as LLaMA-Factory writes for a test set
            swapped = [{**row, "label": ""} for row in swapped]
        _write_jsonl(preds, swapped)
        code, _, err = _cal_acc(capsys, "--test_file", mire_sample / "train_sample.json", "--prediction_file", preds,
                                "--by_position")
        assert code == 2
        assert f"line {i + 1}: " in err and why in err and "not in the same order" in err, err
        assert "1 more rows disagree" in err  # the first problem is named, then the count

    # No prompt and no label: an answer of the other task's labels is the evidence, not something to fix.
    bare = [{"predict": r["output"]} for r in records]
    bare[3], bare[20] = bare[20], bare[3]
    _write_jsonl(preds, bare)
    code, _, err = _cal_acc(capsys, "--test_file", mire_sample / "train_sample.json", "--prediction_file", preds,
                            "--by_position")
    assert code == 2 and "line 4: field 'predict'" in err and "not in the same order" in err, err
    _write_jsonl(preds, bare[:-1])
    code, _, err = _cal_acc(capsys, "--test_file", mire_sample / "train_sample.json", "--prediction_file", preds,
                            "--by_position")
    assert code == 2 and "no ids, and 23 predictions for 24 test records" in err


def _tiny_test_file(tmp_path, labelled=True):
    records = [
        {"id": "img-1", "instruction": "Picture 1: <image>\n你是一个电商领域识图专家,请分类。", "image": ["a.jpg"], "output": A},
        {"id": "dia-1", "instruction": build_dialogue_instruction([("用户", "能推荐一个吗")]), "image": [], "output": X},
    ]
    if not labelled:
        for r in records:
            del r["output"]
    path = tmp_path / ("test.json" if labelled else "test_nolabel.json")
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_id", "test ids without a prediction: 'dia-1'"),
        ("duplicate_id", "ids predicted more than once: 'img-1'"),
        ("unknown_id", "ids not in the test file: 'zzz'"),
        ("empty", "no predictions (empty file)"),
        ("no_ids", "no ids: 2 predictions cannot be paired"),
        ("mixed_ids", "field 'id': missing on lines [2]"),
        ("bad_json", "line 2: not valid JSON"),
        ("no_predict", "line 1: field 'predict': missing field"),
        ("unlabelled_test", "field 'output': missing field"),
        ("unknown_task", "field 'instruction': cannot tell the task"),
    ],
)
def test_cal_acc_bad_input_exits_2_with_a_clear_message(tmp_path, capsys, case, message):
    test_file = _tiny_test_file(tmp_path)
    lines = [json.dumps({"id": "img-1", "predict": A}, ensure_ascii=False),
             json.dumps({"id": "dia-1", "predict": X}, ensure_ascii=False)]
    if case == "missing_id":
        lines = lines[:1]
    elif case == "duplicate_id":
        lines.append(lines[0])
    elif case == "unknown_id":
        lines.append('{"id": "zzz", "predict": "x"}')
    elif case == "empty":
        lines = []
    elif case == "no_ids":
        lines = ['{"predict": "x"}', '{"predict": "y"}']
    elif case == "mixed_ids":
        lines[1] = '{"predict": "x"}'
    elif case == "bad_json":
        lines[1] = '{"id": "dia-1", "predict": '
    elif case == "no_predict":
        lines[0] = '{"id": "img-1", "answer": "x"}'
    elif case == "unlabelled_test":
        test_file = _tiny_test_file(tmp_path, labelled=False)
    elif case == "unknown_task":
        records = json.loads(test_file.read_text(encoding="utf-8"))
        records[1]["instruction"] = "请回答这个问题"
        test_file.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    preds = tmp_path / "p.jsonl"
    preds.write_text("\n".join(lines), encoding="utf-8")
    metrics = tmp_path / "m.json"
    code, out, err = _cal_acc(capsys, "--test_file", test_file, "--prediction_file", preds, "--json_file", metrics)
    assert code == 2
    assert message in err, err
    assert all(line.startswith("error: ") for line in err.strip().splitlines() if not line.startswith("warning"))
    assert not metrics.exists() and out == ""


def test_position_pairing_checks_prompts_rendered_by_llamafactory(mire_sample, tmp_path, capsys):
    """Prompts as LLaMA-Factory's predict writes them (its qwen2_vl template and mm_plugin, decoded with special
    tokens): the order checks accept them in order and catch two swapped, unlabelled conversations."""
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments

    from mire_factory.tiny_model import build_processor, load_qwen2_tokenizer

    tokenizer, processor = load_qwen2_tokenizer(), build_processor()
    template = get_template_and_fix_tokenizer(tokenizer, DataArguments(template="qwen2_vl"))
    subset = [r for i, r in enumerate(_records(mire_sample)) if i < 6 or i in (12, 13)]  # both tasks, some images
    test_file = tmp_path / "test.json"
    test_file.write_text(json.dumps(subset, ensure_ascii=False), encoding="utf-8")
    rows = []
    for r in subset:
        images = [str(mire_sample / "images" / name) for name in r["image"]]
        messages = [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": ""}]
        messages = template.mm_plugin.process_messages(messages, images, [], [], processor)
        prompt_ids, _ = template.encode_oneturn(tokenizer, messages)
        rows.append({"prompt": tokenizer.decode(prompt_ids, skip_special_tokens=False), "predict": r["output"], "label": ""})
    assert sum("<|image_pad|>" in row["prompt"] for row in rows) >= 3
    preds = _write_jsonl(tmp_path / "generated_predictions.jsonl", rows)
    code, out, err = _cal_acc(capsys, "--test_file", test_file, "--prediction_file", preds, "--by_position")
    assert code == 0, err
    assert json.loads(out.splitlines()[0])["f1"] == 1.0
    rows[0], rows[2] = rows[2], rows[0]
    _write_jsonl(preds, rows)
    code, _, err = _cal_acc(capsys, "--test_file", test_file, "--prediction_file", preds, "--by_position")
    assert code == 2 and "line 1: field 'prompt': another conversation" in err and "1 more rows disagree" in err, err


def test_strict_answers_are_exactly_what_constrained_decoding_writes():
    """is_strict_answer: the validity counts of --constrained (no repair), unlike read_answer's lenient reading."""
    from mire_factory.answers import is_strict_answer
    from mire_factory.prompts import format_cot_answer

    image, dialogue = IMAGE_LABELS[0], DIALOGUE_LABELS[0]
    assert is_strict_answer(image, "image", "label") and not is_strict_answer(f" {image}", "image", "label")
    assert not is_strict_answer(dialogue, "image", "label")
    for position in ("last", "first"):
        assert is_strict_answer(format_cot_answer("因为\t截图", dialogue, position), "dialogue", "cot")  # escaped
    raw_tab = format_cot_answer("因为@截图", dialogue).replace("@", "\t")  # as the H200's 11 invalid answers
    assert not is_strict_answer(raw_tab, "dialogue", "cot")
    assert not is_strict_answer(format_cot_answer("r", image), "dialogue", "cot")
    assert not is_strict_answer(json.dumps({"所属类别": dialogue}, ensure_ascii=False), "dialogue", "cot")
    assert not is_strict_answer(json.dumps({"理由": "r", "所属类别": dialogue, "x": 1}), "dialogue", "cot")
    assert not is_strict_answer(f'{{"理由": "r", "所属类别": "{dialogue}"', "dialogue", "cot")


def test_answer_validity_counts_strictly_and_refuses_bad_lines_in_one_line(tmp_path):
    """benchmarks/gpu/answer_validity.py (the GPU check's counter): strict counts, exit 1 when any is invalid; a bad
    line or field is one error line, exit 2, no --json_out written."""
    import subprocess
    import sys

    from conftest import REPO
    from mire_factory.prompts import format_cot_answer

    script = REPO / "benchmarks" / "gpu" / "answer_validity.py"
    rows = [{"id": "a", "task": "dialogue", "predict": format_cot_answer("因为", X)},
            {"id": "b", "task": "dialogue", "predict": format_cot_answer("@", X).replace("@", "\t")}]
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "v.json"
    proc = subprocess.run([sys.executable, script, "--prediction_file", preds, "--answer_format", "cot",
                           "--json_out", out], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    assert json.loads(out.read_text(encoding="utf-8"))["by_task"]["dialogue"] == {"valid": 1, "of": 2}
    preds.write_text(json.dumps({"id": "c", "task": "dialogue"}) + "\n", encoding="utf-8")
    out.unlink()
    proc = subprocess.run([sys.executable, script, "--prediction_file", preds, "--answer_format", "cot",
                           "--json_out", out], capture_output=True, text=True)
    assert proc.returncode == 2 and not out.exists()
    assert proc.stderr.strip().splitlines() == [f"error: {preds}: line 1 (id 'c'): field 'predict' missing or not "
                                                "valid: None"]
