"""One prompt variant, chosen at tools.convert, rendered identically everywhere: for each registered variant,
LLaMA-Factory's own training encoding of a record (its get_dataset -> SupervisedDatasetProcessor path, for the train
file and the validation file the F1 callback generates from) and tools.vllm_infer's inference prompt for the same
record converted as a test file are token-identical; 0-, 1- and multi-image records, synthetic data."""

from __future__ import annotations

import json

import pytest
from test_lf_dataset import lf_datasets

from mire_factory.answers import extract_answer
from mire_factory.convert import convert
from mire_factory.cot import LABEL_VARIANTS, SECOND_TURN, merge_cot, qwen2_token_counter
from mire_factory.dataset_info import COT_LAYOUT_KEY
from mire_factory.f1_callback import split_prompt
from mire_factory.image_info import InfoRecord, file_sha256
from mire_factory.io import MireInputError
from mire_factory.prompt_variants import PROMPT_VARIANTS, get_prompt_variant
from mire_factory.prompts import REASON_QUESTION
from mire_factory.reasons import ReasonRecord
from mire_factory.screenshot_text import qwen2_counter
from mire_factory.synthetic import make_records, write_dataset

IMAGE_MAX_PIXELS = 65536
INFO_MAX_TOKENS = 40
CUTOFF_LEN = 32768


@pytest.fixture(scope="module")
def mire_files(tmp_path_factory):
    """A train file and the same records as a test file (every `output` ""), two classes per task so that a
    validation split exists; dialogues with 0 to 4 images."""
    root = tmp_path_factory.mktemp("variants")
    records = make_records(8, 12, root / "images", seed=21, image_size=(84, 56), max_dialogue_images=4,
                           image_classes=("商品头图", "退款页面"), dialogue_classes=("是否好用", "气泡"))
    counts = {len(r["image"]) for r in records}
    assert {0, 1} <= counts and max(counts) >= 2
    write_dataset(root / "train.json", records)
    write_dataset(root / "test.json", [{**r, "output": ""} for r in records])
    # the screenshot-text variants' info file: a few lines per image, some long enough to be cut to the budget
    lines = []
    for k, path in enumerate(sorted((root / "images").iterdir())):
        text = "\n".join(f"第{k}张图 第{j}行 订单编号{1000 * k + j} 申请售后" for j in range(1 + k % 7))
        lines.append(InfoRecord(path.name, file_sha256(path), "ocr", "test", "ok", text=text).to_json())
    (root / "info.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def _reasons(data, path):
    rows = json.loads((data / "mire_train.json").read_text(encoding="utf-8"))
    lines = []
    for k, row in enumerate(rows):
        gold = extract_answer(row["messages"][1]["content"])  # a CoT answer's label, or the bare label
        lines.append(ReasonRecord(id=row["id"], mode=3, model="t", status="ok", label=gold,
                                  reason=f"第{k}条：用户的问题符合「{gold}」的定义。").to_json())
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def token_counter():
    """merge_cot's Qwen2 token counter, loaded once for the CoT variants."""
    return qwen2_token_counter()


@pytest.fixture(scope="module")
def components(tiny_model_dir):
    """tools.vllm_infer's LLaMA-Factory components at this test's settings (the same for every variant)."""
    from mire_factory.infer.render import load_components

    return load_components(str(tiny_model_dir), image_max_pixels=IMAGE_MAX_PIXELS, cutoff_len=CUTOFF_LEN)


def inference_prompts(model_dir, comp, data, save):
    """tools.vllm_infer on the test split (hf backend, one new token): its rows, and the prompt ids its own
    functions (with components `comp`) render for each record, image tokens expanded as the model receives them."""
    from mire_factory.infer.pipeline import InferArgs, run
    from mire_factory.infer.render import expand_image_tokens, render_prompt_ids
    from mire_factory.infer.truncation import ImageTokenizer, Planner
    from mire_factory.sharegpt import read_sharegpt

    run(InferArgs(model_name_or_path=str(model_dir), dataset="mire_test", dataset_dir=str(data), save_name=str(save),
                  backend="hf", cutoff_len=CUTOFF_LEN, max_new_tokens=1, image_max_pixels=IMAGE_MAX_PIXELS))
    rows = {row["id"]: row for row in map(json.loads, save.read_text(encoding="utf-8").splitlines())}
    records = read_sharegpt("mire_test", data)
    planner = Planner(comp.tokenizer, ImageTokenizer.from_processor(comp.processor),
                      len(render_prompt_ids(comp, "", [])), CUTOFF_LEN)
    ids = {}
    for record, plan in zip(records, planner.plan_many(records), strict=True):
        assert plan.images == record.images and not plan.dropped_turns
        ids[record.id] = expand_image_tokens(render_prompt_ids(comp, plan.content, plan.images), comp.image_pad_id,
                                             plan.image_tokens)
    return rows, ids, comp.tokenizer


def collapse_images(ids, image_pad_id):
    """One image-pad token per image: the form of the `prompt` field tools.vllm_infer writes."""
    return [t for k, t in enumerate(ids) if t != image_pad_id or k == 0 or ids[k - 1] != image_pad_id]


@pytest.mark.parametrize("name", list(PROMPT_VARIANTS))
def test_training_and_inference_prompts_are_token_identical(name, mire_files, tiny_model_dir, components,
                                                            token_counter, tmp_path):
    variant = get_prompt_variant(name)
    data = tmp_path / "data"
    # a screenshot-text variant reads every image's text; a small budget cuts some records' text
    info = dict(info_file=mire_files / "info.jsonl", info_max_tokens=INFO_MAX_TOKENS) if variant.context else {}
    result = convert(mire_files / "train.json", mire_files / "images", data, val_size=0.25, prompt_variant=name,
                     **info)
    if variant.context:
        assert "lines dropped" in result.summary and " 0 cut" not in result.summary
    train_set = "mire_train"
    if variant.answer_format == "cot":
        report = merge_cot(data / "mire_train.json", [_reasons(data, tmp_path / "reasons.jsonl")],
                           data / "mire_train_cot.json", count_tokens=token_counter)
        assert report.full == report.written > 0
        train_set = "mire_train_cot"
    convert(mire_files / "test.json", mire_files / "images", data, prompt_variant=name, **info)
    info = json.loads((data / "dataset_info.json").read_text(encoding="utf-8"))
    assert {entry["mire_prompt_variant"] for entry in info.values()} == {name}

    module, tokenizer = lf_datasets(tiny_model_dir, data, tmp_path / "run", do_train=True, dataset=train_set,
                                    eval_dataset="mire_val", image_max_pixels=IMAGE_MAX_PIXELS)
    rows, infer_ids, _ = inference_prompts(tiny_model_dir, components, data, tmp_path / "pred.jsonl")
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    checked = {"train": 0, "val": 0}
    images_seen = set()
    for split, file, dataset in (("train", f"{train_set}.json", module["train_dataset"]),
                                 ("val", "mire_val.json", module["eval_dataset"])):
        source = json.loads((data / file).read_text(encoding="utf-8"))
        assert len(dataset) == len(source)
        for row, sample in zip(source, dataset, strict=True):
            prompt, answer = split_prompt(sample["input_ids"], sample["labels"])  # what the F1 callback generates from
            assert prompt == infer_ids[row["id"]], (name, split, row["id"])
            # the prompt tools.vllm_infer wrote in its output, images as one pad token each
            assert tokenizer.decode(collapse_images(prompt, image_pad), skip_special_tokens=False) == \
                rows[row["id"]]["prompt"]
            assert tokenizer.decode(answer) == row["messages"][1]["content"] + "<|im_end|>\n"
            images_seen.add(len(row["images"]))
            checked[split] += 1
    assert checked["train"] > 0 and checked["val"] > 0 and {0, 1} <= images_seen and max(images_seen) >= 2
    if variant.answer_format == "cot":  # definitions and answer format at inference too
        assert all(variant.user_suffix(row["task"]).strip() in row["prompt"] for row in rows.values())
    else:
        assert not any("各分类标签的定义" in row["prompt"] for row in rows.values())
    test_rows = json.loads((data / "mire_test.json").read_text(encoding="utf-8"))
    count, blocks = qwen2_counter(), []
    for row in test_rows:  # the image text at inference too, within the budget; none without images
        prompt = rows[row["id"]]["prompt"]
        if variant.context and row["images"]:
            block = prompt[prompt.index("图片中的文字："):].split("<|im_end|>")[0]
            blocks.append(block.split("\n各分类标签的定义")[0])
            assert count(blocks[-1]) <= INFO_MAX_TOKENS
        else:
            assert "图片中的文字" not in prompt
    assert not variant.context or sum("订单编号" in block for block in blocks) > len(blocks) / 2


def supervised_runs(labels):
    """(start, end) of each run of trained (not IGNORE_INDEX) positions."""
    from llamafactory.extras.constants import IGNORE_INDEX

    runs, start = [], None
    for k, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = k
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, k))
            start = None
    return runs


@pytest.mark.parametrize("name", LABEL_VARIANTS)
def test_second_turn_first_exchange_is_the_inference_prompt(name, mire_files, tiny_model_dir, components,
                                                            token_counter, tmp_path):
    """tools.merge_cot --layout second_turn: LLaMA-Factory's training encoding of a merged row (its real template and
    mm_plugin) starts with exactly the prompt tools.vllm_infer renders for the same record of the test file; both
    assistant turns are trained, the follow-up question is not; with mask_history only the reason is."""
    from mire_factory.infer.args import settings_from_yaml
    from mire_factory.infer.pipeline import InferArgs, dataset_variant

    variant = get_prompt_variant(name)
    data = tmp_path / "data"
    info = dict(info_file=mire_files / "info.jsonl", info_max_tokens=INFO_MAX_TOKENS) if variant.context else {}
    convert(mire_files / "train.json", mire_files / "images", data, val_size=0.25, prompt_variant=name, **info)
    report = merge_cot(data / "mire_train.json", [_reasons(data, tmp_path / "reasons.jsonl")],
                       data / "mire_train_reason.json", count_tokens=token_counter, layout=SECOND_TURN)
    assert report.full == report.written > 0
    convert(mire_files / "test.json", mire_files / "images", data, prompt_variant=name, **info)
    registrations = json.loads((data / "dataset_info.json").read_text(encoding="utf-8"))
    assert {entry["mire_prompt_variant"] for entry in registrations.values()} == {name}
    assert registrations["mire_train_reason"][COT_LAYOUT_KEY] == SECOND_TURN
    # tools.vllm_infer --config on the training run: the model's variant is the first exchange's, a label one
    trained = settings_from_yaml({"do_train": True, "output_dir": str(tmp_path / "saves"), "finetuning_type": "full",
                                  "dataset": "mire_train_reason", "dataset_dir": str(data)}, "train.yaml")
    assert trained["prompt_variant"] == name and variant.answer_format == "label"
    args = dict(model_name_or_path=str(tiny_model_dir), dataset="mire_test", prompt_variant=trained["prompt_variant"])
    assert dataset_variant(InferArgs(dataset_dir=str(data), **args)) == variant
    cot = tmp_path / "cot"  # a test file converted for CoT answers is refused for this model
    convert(mire_files / "test.json", mire_files / "images", cot, prompt_variant="cot")
    with pytest.raises(MireInputError, match=f"trained with '{name}'"):
        dataset_variant(InferArgs(dataset_dir=str(cot), **args))

    module, tokenizer = lf_datasets(tiny_model_dir, data, tmp_path / "run", do_train=True,
                                    dataset="mire_train_reason", eval_dataset="mire_val",
                                    image_max_pixels=IMAGE_MAX_PIXELS)
    rows, infer_ids, _ = inference_prompts(tiny_model_dir, components, data, tmp_path / "pred.jsonl")
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    source = json.loads((data / "mire_train_reason.json").read_text(encoding="utf-8"))
    dataset = module["train_dataset"]
    assert len(dataset) == len(source) == report.written
    images_seen = set()
    for row, sample in zip(source, dataset, strict=True):
        ids, labels = sample["input_ids"], sample["labels"]
        label, question, reason = (row["messages"][k]["content"] for k in (1, 2, 3))
        assert question == REASON_QUESTION
        runs = supervised_runs(labels)
        assert len(runs) == 2, (name, row["id"], runs)  # both assistant turns are trained
        (a, b), (c, d) = runs
        assert ids[:a] == infer_ids[row["id"]], (name, row["id"])  # the first exchange's prompt is inference's
        assert tokenizer.decode(collapse_images(ids[:a], image_pad), skip_special_tokens=False) == \
            rows[row["id"]]["prompt"]
        assert tokenizer.decode(ids[a:b]) == label + "<|im_end|>\n"
        assert tokenizer.decode(ids[b:c]) == f"<|im_start|>user\n{REASON_QUESTION}<|im_end|>\n<|im_start|>assistant\n"
        assert tokenizer.decode(ids[c:d]) == reason + "<|im_end|>\n" and d == len(ids)
        assert list(labels[a:b]) == list(ids[a:b]) and list(labels[c:d]) == list(ids[c:d])
        # the F1 callback on such a row: inference's prompt, and the label turn as the gold
        assert split_prompt(ids, labels) == (list(ids[:a]), list(ids[a:b]))
        images_seen.add(len(row["images"]))
    assert {0, 1} <= images_seen and max(images_seen) >= 2
    for row, sample in zip(json.loads((data / "mire_val.json").read_text(encoding="utf-8")), module["eval_dataset"],
                           strict=True):  # the F1 callback's prompts: single-turn, inference's too
        assert split_prompt(sample["input_ids"], sample["labels"])[0] == infer_ids[row["id"]]
    assert not any(REASON_QUESTION in row["prompt"] for row in rows.values())

    # mask_history (LLaMA-Factory: "train on the last turn only") would train the reason and not the label
    masked, _ = lf_datasets(tiny_model_dir, data, tmp_path / "masked", do_train=True, dataset="mire_train_reason",
                            image_max_pixels=IMAGE_MAX_PIXELS, mask_history=True)
    for row, sample, plain in zip(source, masked["train_dataset"], dataset, strict=True):
        assert sample["input_ids"] == plain["input_ids"]
        (start, end), = supervised_runs(sample["labels"])
        assert tokenizer.decode(sample["input_ids"][start:end]) == row["messages"][3]["content"] + "<|im_end|>\n"
