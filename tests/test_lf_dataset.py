"""Converted files through LLaMA-Factory's own dataset pipeline (template qwen2_vl, the tiny model's processor):
no sample dropped, every image expands to the number of tokens the processor computes, in order. The real
llamafactory-cli training on the converted real sample, every record counted, is tests/test_recipes_cli.py's."""

import json
import math
import os
from pathlib import Path

import pytest
from PIL import Image

from mire_factory.convert import convert
from mire_factory.cot import merge_cot, qwen2_token_counter
from mire_factory.reasons import ReasonRecord

IMAGE_PAD, VISION_START, VISION_END, IM_END = 151655, 151652, 151653, 151645
IMAGE_MAX_PIXELS = 262144
CUTOFF_LEN = 32768  # no truncation: the real 4-image dialogue is long


@pytest.fixture(scope="module", autouse=True)
def _lf_env():
    os.environ.setdefault("DISABLE_VERSION_CHECK", "1")


@pytest.fixture(scope="module")
def image_processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(tiny_model_dir)).image_processor


@pytest.fixture(scope="module")
def sample_data(mire_sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("lf_sample")
    convert(mire_sample / "train_sample.json", mire_sample / "images", out, val_size=0)
    return out


@pytest.fixture(scope="module")
def sample_cot(mire_sample, tmp_path_factory):
    """The real sample converted with the cot prompt variant, then merged with reasons (mire_train_cot)."""
    sample_data = tmp_path_factory.mktemp("lf_sample_cot")
    convert(mire_sample / "train_sample.json", mire_sample / "images", sample_data, val_size=0, prompt_variant="cot")
    rows = json.loads((sample_data / "mire_train.json").read_text(encoding="utf-8"))
    lines = []
    for k, row in enumerate(rows):
        gold = json.loads(row["messages"][1]["content"])["所属类别"]
        reason = f"用户的问题和「{gold}」的定义一致。" * (1 + k % 9)  # some must be shortened
        lines.append(ReasonRecord(id=row["id"], mode=2, model="t", status="ok", reason=reason, label=gold).to_json())
    (sample_data / "reasons.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = merge_cot(sample_data / "mire_train.json", [sample_data / "reasons.jsonl"],
                       sample_data / "mire_train_cot.json", count_tokens=qwen2_token_counter())
    assert report.written == 24 and report.shortened > 0
    return sample_data


_TOKENIZER_MODULES: dict[str, dict] = {}


def lf_datasets(model_dir, dataset_dir, out, **overrides):
    """LLaMA-Factory's get_train_args + load_tokenizer + get_dataset, as `llamafactory-cli train` runs them. The
    tokenizer module is loaded once per set of model arguments (the real Qwen2 tokenizer, twice over with the
    processor's: seconds per load, and the same objects every time)."""
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    args = dict(model_name_or_path=str(model_dir), stage="sft", finetuning_type="full", template="qwen2_vl",
                dataset_dir=str(dataset_dir), cutoff_len=CUTOFF_LEN, image_max_pixels=IMAGE_MAX_PIXELS,
                output_dir=str(out), overwrite_cache=True, report_to="none")
    args.update(overrides)
    model_args, data_args, training_args, _, _ = get_train_args(args)
    key = repr(model_args)  # every model argument: path, image pixels, model_max_length (cutoff_len), ...
    if key not in _TOKENIZER_MODULES:
        _TOKENIZER_MODULES[key] = load_tokenizer(model_args)
    tokenizer_module = _TOKENIZER_MODULES[key]
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    module = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)
    return module, tokenizer_module["tokenizer"]


def expected_image_tokens(path, image_processor, max_pixels=IMAGE_MAX_PIXELS):
    """Images above max_pixels are scaled down (aspect kept, as LLaMA-Factory's image_max_pixels documents), then
    the Qwen2-VL image processor's grid, merged 2x2."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        if img.width * img.height > max_pixels:
            f = math.sqrt(max_pixels / (img.width * img.height))
            img = img.resize((int(img.width * f), int(img.height * f)))
        grid = image_processor(images=[img], return_tensors="np")["image_grid_thw"][0]
    return int(grid.prod()) // image_processor.merge_size**2


def image_runs(ids):
    runs, k = [], 0
    while k < len(ids):
        if ids[k] == IMAGE_PAD:
            start = k
            while k < len(ids) and ids[k] == IMAGE_PAD:
                k += 1
            assert ids[start - 1] == VISION_START and ids[k] == VISION_END
            runs.append(k - start)
        else:
            k += 1
    return runs


def source_images(mire_file, image_dir):
    """id -> the record's image files in the MIRE input, in order: the truth the converted rows must keep."""
    return {r["id"]: [Path(image_dir) / n for n in r["image"]] for r in _rows(mire_file)}


def check_samples(dataset, rows, sources, tokenizer, image_processor, with_labels=True):
    assert len(dataset) == len(rows), "LLaMA-Factory dropped samples"
    for sample, row in zip(dataset, rows, strict=True):
        ids = sample["input_ids"]
        expected = [expected_image_tokens(path, image_processor) for path in sources[row["id"]]]
        assert image_runs(ids) == expected, row["id"]
        assert ids.count(IMAGE_PAD) == sum(expected)
        # the text around the images is the user turn, in order
        text = tokenizer.decode([t for t in ids if t != IMAGE_PAD])
        user = row["messages"][0]["content"].replace("<image>", "<|vision_start|><|vision_end|>")
        assert f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n" in text
        if with_labels:
            target = [t for t in sample["labels"] if t != -100]
            assert tokenizer.decode(target) == row["messages"][1]["content"] + "<|im_end|>\n"


def _rows(path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def make_positional_data(root, n_image, n_dialogue, seed, with_labels=True):
    """Synthetic MIRE data whose k-th image of a record is (56(k+1))x(28(k+3)): 6, 16, 30, 48 image tokens, so a
    swapped or shifted image shows in the token runs. (Real screenshots all exceed image_max_pixels and expand to
    about the same count, so their order is checked file-side in test_convert.)"""
    from mire_factory.synthetic import make_records, write_dataset

    records = make_records(n_image, n_dialogue, root / "images", seed=seed, with_labels=with_labels)
    for r in records:
        for k, name in enumerate(r["image"]):
            with Image.open(root / "images" / name) as img:
                img.resize((56 * (k + 1), 28 * (k + 3))).save(root / "images" / name)
    write_dataset(root / "mire.json", records)
    assert any(len(r["image"]) >= 3 for r in records)
    return root / "mire.json", root / "images"


def test_synthetic_train_val_and_test(tiny_model_dir, image_processor, tmp_path):
    train = make_positional_data(tmp_path / "train_src", 10, 40, seed=3)
    convert(*train, tmp_path / "d", val_size=0.2)
    module, tokenizer = lf_datasets(tiny_model_dir, tmp_path / "d", tmp_path / "run", do_train=True,
                                    dataset="mire_train,mire_val")
    rows = _rows(tmp_path / "d" / "mire_train.json") + _rows(tmp_path / "d" / "mire_val.json")
    assert len(rows) == 50
    check_samples(module["train_dataset"], rows, source_images(*train), tokenizer, image_processor)
    # test files: the empty assistant turn keeps every record in predict
    test = make_positional_data(tmp_path / "test_src", 3, 12, seed=4, with_labels=False)
    convert(*test, tmp_path / "t")
    module, tokenizer = lf_datasets(tiny_model_dir, tmp_path / "t", tmp_path / "run2", do_predict=True,
                                    predict_with_generate=True, eval_dataset="mire_test")
    check_samples(module["eval_dataset"], _rows(tmp_path / "t" / "mire_test.json"), source_images(*test),
                  tokenizer, image_processor, with_labels=False)


def test_real_sample_and_cot(sample_cot, mire_sample, tiny_model_dir, image_processor, tmp_path):
    module, tokenizer = lf_datasets(tiny_model_dir, sample_cot, tmp_path / "run", do_train=True,
                                    dataset="mire_train,mire_train_cot")
    rows = _rows(sample_cot / "mire_train.json")
    cot_rows = _rows(sample_cot / "mire_train_cot.json")
    assert sorted(len(r["images"]) for r in rows)[0] == 0 and max(len(r["images"]) for r in rows) == 4
    sources = source_images(mire_sample / "train_sample.json", mire_sample / "images")
    check_samples(module["train_dataset"], rows + cot_rows, sources, tokenizer, image_processor)
    for sample in list(module["train_dataset"])[len(rows):]:  # the CoT answers as trained: <= 100 tokens
        target = [t for t in sample["labels"] if t != -100]
        assert target[-2:] == [IM_END, tokenizer.encode("\n")[0]]
        assert len(target) - 1 <= 100  # answer + <|im_end|>; the trailing "\n" is never generated
