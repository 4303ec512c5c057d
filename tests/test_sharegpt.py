"""The one ShareGPT writer and reader (mire_factory.sharegpt): what tools.convert writes reads back as the same
records, and every row reads exactly as LLaMA-Factory's own training read (datasets + align_dataset) gives it."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from mire_factory.convert import convert, user_content
from mire_factory.io import MireInputError
from mire_factory.prompt_variants import get_prompt_variant
from mire_factory.records import load_records
from mire_factory.sharegpt import chat_row, read_sharegpt, sharegpt_entry
from mire_factory.taxonomy import build_dialogue_instruction


@pytest.fixture(scope="module")
def converted(mire_sample, tmp_path_factory):
    """The real sample as tools.convert writes it (cot): mire_train, mire_val, and mire_test from its unlabelled
    copy; plus `with_system`, chat rows with a system turn as tools.generate exports them."""
    out = tmp_path_factory.mktemp("sharegpt")
    convert(mire_sample / "train_sample.json", mire_sample / "images", out, val_size=0.2, prompt_variant="cot")
    rows = json.loads((mire_sample / "train_sample.json").read_text(encoding="utf-8"))
    test = out.parent / f"{out.name}_test.json"
    test.write_text(json.dumps([{k: v for k, v in r.items() if k != "output"} for r in rows], ensure_ascii=False),
                    encoding="utf-8")
    convert(test, mire_sample / "images", out, prompt_variant="cot")
    records = load_records(mire_sample / "train_sample.json", mire_sample / "images")[:3]
    images = Path(mire_sample / "images").resolve()
    system_rows = [chat_row(r.instruction, r.output, [str(images / n) for n in r.images], system="你是客服质检员。",
                            row_id=r.id) for r in records]
    (out / "with_system.json").write_text(json.dumps(system_rows, ensure_ascii=False), encoding="utf-8")
    info = json.loads((out / "dataset_info.json").read_text(encoding="utf-8"))
    info["with_system"] = sharegpt_entry("with_system.json", prompt_variant=None)
    (out / "dataset_info.json").write_text(json.dumps(info, ensure_ascii=False), encoding="utf-8")
    return out


def llamafactory_read(dataset_dir: Path, name: str, cache: Path) -> list[dict]:
    """LLaMA-Factory's training read of a registered file: its parser, `datasets`' json loader, align_dataset."""
    from datasets import load_dataset
    from llamafactory.data.converter import align_dataset
    from llamafactory.data.parser import get_dataset_list
    from llamafactory.hparams import DataArguments

    (attr,) = get_dataset_list([name], str(dataset_dir))
    data = load_dataset("json", data_files=str(dataset_dir / attr.dataset_name), split="train", cache_dir=str(cache))
    data_args = DataArguments(dataset_dir=str(dataset_dir), overwrite_cache=True)
    return list(align_dataset(data, attr, data_args, SimpleNamespace(local_process_index=0)))


@pytest.mark.parametrize("name", ["mire_train", "mire_val", "mire_test", "with_system"])
def test_every_row_reads_as_llamafactory_training_reads_it(converted, name, tmp_path):
    records = read_sharegpt(name, converted)
    aligned = llamafactory_read(converted, name, tmp_path)
    assert len(records) == len(aligned) > 0
    for record, row in zip(records, aligned, strict=True):
        assert row["_prompt"] == [{"role": "user", "content": record.instruction}], record.id
        assert row["_response"] == [{"role": "assistant", "content": record.response}], record.id
        assert row["_system"] == record.system and (row["_images"] or []) == record.images, record.id
    if name == "with_system":
        assert all(r.system == "你是客服质检员。" for r in records)
    if name == "mire_test":
        assert all(r.response == "" and r.output is None for r in records)


def test_convert_then_read_gives_back_the_records(converted, mire_sample):
    variant = get_prompt_variant("cot")
    source = {r.id: r for r in load_records(mire_sample / "train_sample.json", mire_sample / "images")}
    read = read_sharegpt("mire_train", converted, train=True) + read_sharegpt("mire_val", converted, train=True)
    assert sorted(r.id for r in read) == sorted(source)
    for record in read:
        mire = source[record.id]
        assert (record.task, record.output) == (mire.task, mire.output)
        assert record.instruction == variant.user_turn(user_content(mire), mire.task)
        assert record.response == variant.answer(mire.output)
        assert [Path(p).resolve() for p in record.images] == \
            [(mire_sample / "images" / n).resolve() for n in mire.images]


def _write(root: Path, rows: list, entry: dict, name: str = "d") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / entry["file_name"]).write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    (root / "dataset_info.json").write_text(json.dumps({name: entry}), encoding="utf-8")
    return root


QUESTION = build_dialogue_instruction([("用户", "贴膜有气泡怎么办")])


def test_llamafactory_defaults_come_from_its_parser(tmp_path):
    """A registration naming no columns or tags reads LLaMA-Factory's defaults (conversations, from/value,
    human/gpt, no images); one naming some tags gets None for the others, as LLaMA-Factory reads it, and is refused
    rather than read with defaults LLaMA-Factory would not use."""
    rows = [{"id": "a", "conversations": [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": "气泡"}]}]
    root = _write(tmp_path / "lf", rows, {"file_name": "d.json", "formatting": "sharegpt"})
    (record,) = read_sharegpt("d", root, train=True)
    assert (record.id, record.task, record.output, record.response, record.images) == \
        ("a", "dialogue", "气泡", "气泡", [])
    root = _write(tmp_path / "partial", rows, {"file_name": "d.json", "formatting": "sharegpt",
                                               "tags": {"role_tag": "from", "user_tag": "human",
                                                        "assistant_tag": "gpt"}})
    with pytest.raises(MireInputError) as err:
        read_sharegpt("d", root)
    assert err.value.lines == [f"{root / 'd.json'}: record 'a': field 'conversations': message content must be a string"]


def test_bad_rows_give_one_line_each_naming_record_and_field(tmp_path):
    def row(rid, user=QUESTION, images=(), answer="气泡", roles=("user", "assistant")):
        return {"id": rid, "messages": [{"role": role, "content": text} for role, text in zip(roles, (user, answer), strict=True)],
                "images": list(images)}

    (tmp_path / "a.png").write_bytes(b"not read: only its existence is checked")
    rows = [row("ok", user="<image>" + QUESTION, images=["a.png"]), "text", row("ok"),
            {"id": "m", "messages": "hello"}, row("r", roles=("assistant", "user")), row("c", answer=5),
            row("n", user="<image>" + QUESTION, images=["a\x00.png"]), row("p", user="<image><image>" + QUESTION),
            row("t", user="你好"), row("missing", user="<image>" + QUESTION, images=["gone.png"])]
    root = _write(tmp_path, rows, sharegpt_entry("d.json"))
    with pytest.raises(MireInputError) as err:
        read_sharegpt("d", root)
    fields = [line.split(": ")[1:3] for line in err.value.lines]
    assert fields == [["record #1", "expected a JSON object, got str"], ["record 'ok'", "field 'id'"],
                      ["record 'm'", "field 'messages'"], ["record 'r'", "field 'messages'"],
                      ["record 'c'", "field 'messages'"], ["record 'n'", "field 'images'"],
                      ["record 'p'", "field 'images'"], ["record 't'", "field 'messages[0].content'"],
                      ["record 'missing'", "field 'images[0]'"]]
    assert "image not found" in err.value.lines[-1] and "placeholders but 0 images" in err.value.lines[6]
    kept = read_sharegpt("d", _write(tmp_path / "lenient", [rows[0], rows[-1]], sharegpt_entry("d.json")),
                         check_images=False)
    assert kept[1].images == ["gone.png"]  # as written: LLaMA-Factory keeps a name it cannot find


def test_train_rows_need_an_id_and_a_known_gold_label(tmp_path):
    rows = [chat_row(QUESTION, json.dumps({"理由": "", "所属类别": "气泡"}, ensure_ascii=False), [], row_id="cot"),
            chat_row(QUESTION, "气泡", []), chat_row(QUESTION, "", [], row_id="test"),
            chat_row(QUESTION, "商品头图", [], row_id="wrong")]
    root = _write(tmp_path, rows, sharegpt_entry("d.json"))
    with pytest.raises(MireInputError) as err:
        read_sharegpt("d", root, train=True)
    assert [line.split(": ", 1)[1] for line in err.value.lines] == [
        "record #1: field 'id': expected a unique non-empty string, got None",
        "record 'test': field 'messages[1].content': no gold label (a test file?)",
        "record 'wrong': field 'messages[1].content': unknown label '商品头图' for the dialogue task"]
    records = read_sharegpt("d", root)
    assert [(r.id, r.output) for r in records] == [("cot", "气泡"), ("1", "气泡"), ("test", None), ("wrong", None)]
