"""The screenshot-text block: rendering, the token budget with the real Qwen2 tokenizer, lookups by image bytes."""

from __future__ import annotations

import pytest
from PIL import Image

from mire_factory.image_info import InfoRecord, file_sha256
from mire_factory.io import MireInputError
from mire_factory.records import load_records
from mire_factory.screenshot_text import ScreenshotText, fit_block, qwen2_counter, render_block
from mire_factory.synthetic import make_records, write_dataset

RETURN_PAGE = ["选择退货方式", "商家已同意退货", "请使用菜鸟裹裹寄回商品", "您有退货运费未付", "支付后才可使用在线寄件",
               "去支付或去反馈问题>>", "寄件商品", "颜色分类：粉红草莓熊三件套[全车坐垫]"]


def test_render_block_one_and_several_images():
    assert render_block([]) == ""
    assert render_block([["a", "b"]]) == "图片中的文字：\na\nb"
    assert render_block([["a"], [], ["c"]]) == "图片中的文字：\n[图片1]\na\n[图片2]\n无\n[图片3]\nc"


@pytest.mark.parametrize("budget", [200, 60, 40, 25, 16])
def test_fit_block_respects_the_budget_with_whole_lines_from_the_longest(budget):
    count = qwen2_counter()
    texts = ["\n".join(RETURN_PAGE), "ORDER 1\nTRACK 2"]
    block, dropped = fit_block(texts, budget, count)
    assert count(block) <= budget
    lines = block.split("\n")
    first = lines[lines.index("[图片1]") + 1: lines.index("[图片2]")]
    second = lines[lines.index("[图片2]") + 1:]
    kept_first = [] if first == ["无"] else first
    kept_second = [] if second == ["无"] else second
    assert kept_first == RETURN_PAGE[: len(kept_first)]  # a prefix of whole lines, in reading order
    assert kept_second == ["ORDER 1", "TRACK 2"][: len(kept_second)]
    assert dropped == len(RETURN_PAGE) - len(kept_first) + 2 - len(kept_second)
    if dropped:  # the budget is used: one more line would not fit
        assert count(block) > budget - 12
    if budget >= 40:
        assert kept_second == ["ORDER 1", "TRACK 2"]  # the short text keeps its lines; the long one gives way
    if budget == 200:
        assert dropped == 0


def test_fit_block_refuses_a_budget_below_the_heads():
    with pytest.raises(MireInputError, match="--info_max_tokens 3"):
        fit_block(["a", "b"], 3, qwen2_counter())


@pytest.fixture
def records_and_info(tmp_path):
    write_dataset(tmp_path / "train.json", make_records(3, 4, tmp_path / "images", seed=4, max_dialogue_images=3))
    records = load_records(tmp_path / "train.json", tmp_path / "images")
    lines = []
    for k, path in enumerate(sorted((tmp_path / "images").iterdir())):
        lines.append(InfoRecord(path.name, file_sha256(path), "ocr", "m", "ok", text=f"第{k}张\n文字{k}").to_json())
    (tmp_path / "info.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return records, tmp_path


def test_contexts_by_image_bytes_and_missing_images_named(records_and_info):
    records, root = records_and_info
    contexts = ScreenshotText(root / "info.jsonl", 64).contexts(records, root / "images", root / "train.json")
    for record, context in zip(records, contexts, strict=True):
        if not record.images:
            assert context == ""
        else:
            assert context.startswith("图片中的文字：") and context.count("张") == len(record.images)
    # an image changed after extraction: its text is not used, and the message says why
    record = next(r for r in records if r.images)
    Image.new("RGB", (30, 30), "red").save(root / "images" / record.images[0])
    with pytest.raises(MireInputError) as err:
        ScreenshotText(root / "info.jsonl", 64).contexts(records, root / "images", root / "train.json")
    assert f"record {record.id!r}" in str(err.value) and "made from other bytes" in str(err.value)


def _rows(path):
    import json

    return json.loads(path.read_text(encoding="utf-8"))


def test_convert_puts_the_text_after_the_instruction_in_every_split_and_format(records_and_info, tmp_path):
    import json

    from conftest import call_tool

    _, root = records_and_info
    out = tmp_path / "data"
    proc = call_tool("convert", "--input_file", root / "train.json", "--image_dir", root / "images",
                     "--output_dir", out, "--prompt_variant", "screenshot_text", "--info_file", root / "info.jsonl",
                     "--val_size", "0.3")
    assert proc.returncode == 0, proc.stderr
    assert "screenshot text from" in proc.stdout
    source = {r["id"]: r for r in json.loads((root / "train.json").read_text(encoding="utf-8"))}
    (root / "test.json").write_text(json.dumps([{**r, "output": ""} for r in source.values()], ensure_ascii=False),
                                    encoding="utf-8")
    proc = call_tool("convert", "--input_file", root / "test.json", "--image_dir", root / "images",
                     "--output_dir", out, "--prompt_variant", "screenshot_text", "--info_file", root / "info.jsonl")
    assert proc.returncode == 0, proc.stderr
    splits = sorted(p.stem for p in out.glob("mire_*.json"))
    assert "mire_train" in splits and "mire_test" in splits
    seen = 0
    for split in splits:
        for row in _rows(out / f"{split}.json"):
            user = row["messages"][0]["content"]
            instruction = source[row["id"]]["instruction"]
            if row["images"]:
                assert user.startswith(instruction + "\n图片中的文字：\n") and user.count("张") == len(row["images"])
                seen += 1
            else:
                assert user == instruction
    assert seen > 0
    info = json.loads((out / "dataset_info.json").read_text(encoding="utf-8"))
    for split in splits:
        entry = info[split]
        assert entry["mire_prompt_variant"] == "screenshot_text"
        assert entry["mire_screenshot_text"]["info_max_tokens"] == 256
        assert entry["mire_screenshot_text"]["info_file"] == str((root / "info.jsonl").resolve())
    swift = tmp_path / "swift"
    proc = call_tool("convert", "--input_file", root / "train.json", "--image_dir", root / "images",
                     "--output_dir", swift, "--prompt_variant", "screenshot_text", "--info_file", root / "info.jsonl",
                     "--format", "swift", "--val_size", "0.3")
    assert proc.returncode == 0, proc.stderr
    swift_rows = [json.loads(x) for x in (swift / "mire_train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["messages"] for r in swift_rows] == [r["messages"] for r in _rows(out / "mire_train.json")]


def test_convert_refuses_what_the_variant_cannot_use(records_and_info, tmp_path):
    from conftest import call_tool

    records, root = records_and_info
    partial = tmp_path / "partial.jsonl"
    lines = (root / "info.jsonl").read_text(encoding="utf-8").splitlines()
    partial.write_text("\n".join(lines[1:]) + "\n", encoding="utf-8")
    missing = sorted(p.name for p in (root / "images").iterdir())[0]
    owner = next(r for r in records if missing in r.images)
    base = ["--input_file", root / "train.json", "--image_dir", root / "images", "--output_dir", tmp_path / "out"]
    cases = [
        (["--prompt_variant", "screenshot_text"], "needs --info_file"),
        (["--info_file", root / "info.jsonl"], "prompt variant plain puts no image text"),
        (["--prompt_variant", "screenshot_text", "--info_file", partial], f"record {owner.id!r}: field 'image': "
                                                                          f"{missing}: no text in {partial}"),
        (["--prompt_variant", "screenshot_text", "--info_file", root / "info.jsonl", "--info_max_tokens", "0"],
         "--info_max_tokens must be at least 1"),
        (["--prompt_variant", "screenshot_text", "--info_file", root / "train.json"], "line 1"),
    ]
    for args, why in cases:
        proc = call_tool("convert", *base, *args)
        assert proc.returncode == 2 and why in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert not (tmp_path / "out").exists()


def test_sizing_counts_the_screenshot_text(records_and_info):
    from mire_factory.recipe_sizing import measure

    records, root = records_and_info
    plain = measure(records, root / "images", 65536, "plain")
    with_text = measure(records, root / "images", 65536, "screenshot_text", root / "info.jsonl", 64)
    contexts = ScreenshotText(root / "info.jsonl", 64).contexts(records, root / "images", "x")
    count = qwen2_counter()
    for record, a, b, context in zip(records, plain, with_text, contexts, strict=True):
        assert b.image_tokens == a.image_tokens
        # the text's own tokens, give or take one merged at the seam with the instruction
        delta = b.total_tokens - a.total_tokens
        assert (count("\n" + context) - 1 <= delta <= count("\n" + context)) if context else delta == 0, record.id
    assert any(context for context in contexts)
