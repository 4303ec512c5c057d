"""tools.convert --augment: augmented train copies (mire_factory/augment.py) with their images written once
(mire_factory/image_copies.py); never in val or test."""

import json
import random
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image, ImageChops

from conftest import call_tool, convert_ok
from mire_factory.augment import MASK_TOKEN, draw_image_ops, mask_user_turns
from mire_factory.image_copies import DERIVED_DIR, OPS
from mire_factory.io import read_json
from mire_factory.synthetic import make_records, write_dataset
from mire_factory.taxonomy import AGENT_PREFIX, DIALOGUE_END, DIALOGUE_START, USER_PREFIX, build_dialogue_instruction


@pytest.fixture(scope="module")
def small_train(tmp_path_factory):
    root = tmp_path_factory.mktemp("aug")
    records = make_records(8, 8, root / "images", seed=4, image_size=(120, 90), max_dialogue_images=2,
                           phrase_turns=2, image_classes=("商品头图", "退款页面"), dialogue_classes=("是否好用", "气泡"))
    write_dataset(root / "train.json", records)
    return root, {r["id"]: r for r in records}


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_augment_adds_copies_to_train_only_and_writes_images_once(small_train, tmp_path):
    root, source = small_train
    out = tmp_path / "out"
    args = ["--input_file", root / "train.json", "--image_dir", root / "images", "--val_size", "0.25", "--augment", "2"]
    proc = convert_ok(*args, "--output_dir", out)
    train, val = read_json(out / "mire_train.json"), read_json(out / "mire_val.json")
    originals = [r for r in train if "#aug" not in r["id"]]
    copies = [r for r in train if "#aug" in r["id"]]
    assert len(val) == 4 and len(originals) == 12 and len(copies) == 24
    assert Counter(r["id"] for r in copies) == Counter(f"{r['id']}#aug{k}" for r in originals for k in (1, 2))
    # val: no copies, the source images themselves
    assert not any("#aug" in r["id"] or DERIVED_DIR in p for r in val for p in r["images"])
    val_ids = {r["id"] for r in val}
    assert not any(r["id"].split("#")[0] in val_ids for r in copies)  # no copy of a validation record anywhere
    info = read_json(out / "dataset_info.json")
    assert info["mire_train"]["mire_augment"]["rows"] == 24 and info["mire_train"]["mire_augment"]["copies"] == 2
    assert "mire_augment" not in info["mire_val"]
    assert "24 more rows in mire_train" in proc.stdout

    by_id = {r["id"]: r for r in originals}
    masked_dialogues = 0
    for row in copies:
        src = by_id[row["id"].split("#")[0]]
        assert row["messages"][1] == src["messages"][1]  # the label is never touched
        assert len(row["images"]) == len(src["images"])
        for derived, original in zip(row["images"], src["images"], strict=True):
            assert derived.startswith(DERIVED_DIR + "/") and (out / derived).is_file()
            with Image.open(out / derived) as a, Image.open(out / original) as b:
                a, b = a.convert("RGB"), b.convert("RGB")
                assert a.size != b.size or ImageChops.difference(a, b).getbbox() is not None  # a changed picture
        user, src_user = row["messages"][0]["content"], src["messages"][0]["content"]
        if "多轮对话" not in src_user:
            assert user == src_user  # image records: the official instruction as it is
            continue
        assert len(user) == len(src_user) and user.count("<image>") == src_user.count("<image>")
        changed = [(a, b) for a, b in zip(user, src_user, strict=True) if a != b]
        assert changed and all(a == MASK_TOKEN and b.isalnum() for a, b in changed)
        masked_dialogues += 1
        for line, src_line in zip(user.splitlines(), src_user.splitlines(), strict=True):
            if line != src_line:
                assert line.startswith(USER_PREFIX)  # only the customer's turns
    assert masked_dialogues == sum(1 for r in copies if "多轮对话" in r["messages"][0]["content"]) > 0

    # Written once: a rerun rewrites no derived image (same inode, same mtime) and gives the same rows
    before = _files(out / DERIVED_DIR)
    assert len(before) == sum(len(r["images"]) for r in copies)
    proc = convert_ok(*args, "--output_dir", out)
    assert _files(out / DERIVED_DIR) == before
    assert f"({0} written, {len(before)} of an earlier run kept)" in proc.stdout
    assert read_json(out / "mire_train.json") == train
    # Seeded: another folder, the same bytes; another seed, other copies
    convert_ok(*args, "--output_dir", tmp_path / "again")
    assert (tmp_path / "again" / "mire_train.json").read_bytes() == (out / "mire_train.json").read_bytes()
    assert {p.name for p in (tmp_path / "again" / DERIVED_DIR).iterdir()} == set(before)
    convert_ok(*args, "--output_dir", tmp_path / "other", "--seed", "7")
    assert read_json(tmp_path / "other" / "mire_train.json") != train
    # the derived images are what LLaMA-Factory's training reader resolves
    from mire_factory.sharegpt import read_sharegpt

    assert len(read_sharegpt("mire_train", out, train=True)) == 36


def test_augment_is_refused_for_test_files_and_bad_values_writing_nothing(small_train, tmp_path):
    root, source = small_train
    test = [{**r, "output": ""} for r in source.values()]
    write_dataset(tmp_path / "test.json", test)
    out = tmp_path / "out"
    cases = [
        (["--input_file", tmp_path / "test.json", "--augment", "1"], ["test.json", "--augment"]),
        (["--input_file", root / "train.json", "--augment", "-1"], ["--augment", "-1"]),
        (["--input_file", root / "train.json", "--augment", "1", "--augment_mask_ratio", "1"],
         ["--augment_mask_ratio"]),
    ]
    for extra, words in cases:
        proc = call_tool("convert", "--image_dir", root / "images", "--output_dir", out, *extra)
        errors = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(errors) == 1, proc.stderr
        assert all(w in errors[0] for w in words), errors
        assert not out.exists()


def test_a_copy_that_cannot_be_decoded_leaves_nothing_half_written(tmp_path):
    records = make_records(2, 0, tmp_path / "images", seed=3, image_size=(200, 200), image_format="JPEG")
    write_dataset(tmp_path / "train.json", records)
    bad = tmp_path / "images" / records[0]["image"][0]
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])  # the header reads (--quick), the pixels do not
    out = tmp_path / "out"
    out.mkdir()
    proc = call_tool("convert", "--input_file", tmp_path / "train.json", "--image_dir", tmp_path / "images",
                     "--output_dir", out, "--augment", "1", "--val_size", "0", "--quick")
    assert proc.returncode == 2 and bad.name in proc.stderr and "Traceback" not in proc.stderr
    # no split, no derived_images folder, no temp file: only the convert lock (kept on purpose, see io.output_lock)
    assert [p.name for p in out.iterdir()] == [".mire_train.lock"]


def test_masking_touches_only_customer_characters():
    instruction = build_dialogue_instruction([("用户", "我想问一下这个<http>多少钱abc123"), ("客服", "您好在的"),
                                              ("用户", "<image>"), ("客服", "请说明"), ("用户", "好的，谢谢！"),
                                              ("客服", "")])
    for seed in range(20):
        masked = mask_user_turns(instruction, 0.5, random.Random(seed))
        head, tail = instruction.split(DIALOGUE_START)[0], instruction.split(DIALOGUE_END)[1]
        assert masked.startswith(head + DIALOGUE_START) and masked.endswith(DIALOGUE_END + tail)
        assert masked.count("<http>") == 1 and masked.count("<image>") == 1
        for line, src in zip(masked.splitlines(), instruction.splitlines(), strict=True):
            if src.startswith(AGENT_PREFIX) or not src.startswith(USER_PREFIX):
                assert line == src
        maskable = sum(c.isalnum() for line in instruction.splitlines() if line.startswith(USER_PREFIX)
                       for c in line[len(USER_PREFIX):].replace("<http>", "").replace("<image>", ""))
        assert masked.count(MASK_TOKEN) == round(0.5 * maskable)
    assert mask_user_turns(instruction, 0.0, random.Random(0)) == instruction


def test_image_transforms_are_never_empty_and_cover_the_set():
    kinds = Counter()
    for seed in range(300):
        ops = draw_image_ops(random.Random(seed))
        assert ops and [op.kind for op in ops] == sorted((op.kind for op in ops), key=OPS.index)
        kinds.update(op.kind for op in ops)
    assert set(kinds) == {"scale", "gray", "brightness", "jpeg"}


def test_merge_cot_gives_a_copy_its_sources_reason(small_train, tmp_path):
    from mire_factory.cot import merge_cot
    from mire_factory.prompts import LABEL_KEY, REASON_KEY
    from mire_factory.reasons import ReasonRecord

    root, source = small_train
    out = tmp_path / "out"
    convert_ok("--input_file", root / "train.json", "--image_dir", root / "images", "--output_dir", out,
             "--val_size", "0", "--augment", "1", "--prompt_variant", "cot")
    reasons = tmp_path / "reasons.jsonl"
    reasons.write_text("".join(ReasonRecord(rid, 2, "teacher", "ok", reason=f"理由{rid}", label=r["output"],
                                            gold=r["output"]).to_json() + "\n" for rid, r in source.items()),
                       encoding="utf-8")
    report = merge_cot(out / "mire_train.json", [reasons], out / "mire_train_cot.json")
    rows = {r["id"]: r for r in read_json(out / "mire_train_cot.json")}
    assert report.written == len(rows) == 2 * len(source) and not report.unexplained
    train = {r["id"]: r for r in read_json(out / "mire_train.json")}
    for rid in source:
        copy = rows[f"{rid}#aug1"]
        assert json.loads(copy["messages"][1]["content"]) == {REASON_KEY: f"理由{rid}", LABEL_KEY: source[rid]["output"]}
        assert copy["messages"][0] == train[f"{rid}#aug1"]["messages"][0] and copy["images"] == train[f"{rid}#aug1"]["images"]
