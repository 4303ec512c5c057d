"""tools.vllm_infer end to end with the transformers backend and the tiny random-weight model."""

from __future__ import annotations

import json

import pytest
from test_infer_units import write_sharegpt

from conftest import run_tool
from mire_factory.taxonomy import LABELS, is_valid_label


def read_rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def synthetic_dataset(tmp_path_factory):
    from mire_factory.synthetic import make_records

    root = tmp_path_factory.mktemp("infer_synthetic")
    records = make_records(5, 9, root / "src", seed=7, image_size=(96, 64), max_dialogue_images=3)
    return write_sharegpt(records, root / "src", root / "ds", with_labels=False), [r["id"] for r in records]


def infer_args(model, dataset_dir, save, **kw):
    from mire_factory.infer.pipeline import InferArgs

    fields = dict(model_name_or_path=model and str(model), dataset="mire_test", dataset_dir=str(dataset_dir),
                  save_name=str(save), backend="hf", cutoff_len=1024, max_new_tokens=12, image_max_pixels=65536,
                  batch_size=4)
    return InferArgs(**{**fields, **kw})


def test_prompts_equal_llamafactory_training_prompts(tiny_model_dir, mire_sample, tmp_path):
    """Same record -> our inference prompt ids == the prompt part of LLaMA-Factory's own sft training sequence."""
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    from mire_factory.infer.dataset import load_dataset
    from mire_factory.infer.render import expand_image_tokens, load_components, render_prompt_ids
    from mire_factory.records import load_records

    ds = write_sharegpt(load_records(mire_sample / "train_sample.json", mire_sample / "images"),
                        mire_sample / "images", tmp_path / "ds")
    model_args, data_args, training_args, _, _ = get_train_args(dict(
        model_name_or_path=str(tiny_model_dir), stage="sft", do_train=True, finetuning_type="lora",
        dataset="mire_test", dataset_dir=str(ds), template="qwen2_vl", cutoff_len=100_000, image_max_pixels=65536,
        output_dir=str(tmp_path / "out"), overwrite_cache=True, report_to="none"))
    module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(module["tokenizer"], data_args)
    train = get_dataset(template, model_args, data_args, training_args, stage="sft", **module)["train_dataset"]

    comp = load_components(str(tiny_model_dir), image_max_pixels=65536)
    records = load_dataset("mire_test", ds)
    assert len(train) == len(records) == 24
    for record, row in zip(records, train, strict=True):
        n_prompt = next(i for i, label in enumerate(row["labels"]) if label != -100)
        ids = render_prompt_ids(comp, record.content, record.images)
        mm = comp.template.mm_plugin._get_mm_inputs(record.images, [], [], comp.processor) if record.images else {}
        counts = [int(g.prod()) // comp.merge_length for g in mm.get("image_grid_thw", [])]
        assert expand_image_tokens(ids, comp.image_pad_id, counts) == row["input_ids"][:n_prompt], record.id


def test_real_sample_constrained_truncated_at_512(tiny_model_dir, mire_sample, tmp_path):
    from mire_factory.records import load_records

    records = load_records(mire_sample / "train_sample.json", mire_sample / "images")
    ds = write_sharegpt(records, mire_sample / "images", tmp_path / "ds", with_labels=True)
    save = tmp_path / "pred.jsonl"
    proc = run_tool("vllm_infer", "--model_name_or_path", tiny_model_dir, "--dataset", "mire_test",
                    "--dataset_dir", ds, "--backend", "hf", "--save_name", save, "--cutoff_len", "512",
                    "--max_new_tokens", "12", "--image_max_pixels", "65536", "--batch_size", "8", "--constrained")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_rows(save)
    assert [r["id"] for r in rows] == [r.id for r in records]
    for row, record in zip(rows, records, strict=True):
        assert is_valid_label(row["predict"], record.task) and row["predict"] in LABELS[record.task], row
        assert row["label"] == record.output and row["truncation"]["prompt_tokens"] <= 512
    assert sum(bool(r["truncation"]["dropped_turns"]) for r in rows) >= 5
    assert all("<用户与客服的对话 END>" in r["prompt"] for r in rows if r["task"] == "dialogue")


def test_refuses_more_than_100_new_tokens(tmp_path, synthetic_dataset):
    ds, _ = synthetic_dataset
    proc = run_tool("vllm_infer", "--model_name_or_path", "unused", "--dataset", "mire_test", "--dataset_dir", ds,
                    "--max_new_tokens", "101", "--save_name", tmp_path / "p.jsonl")
    assert proc.returncode == 2 and "--no_competition_limits" in proc.stderr
    assert not (tmp_path / "p.jsonl").exists()
    proc = run_tool("vllm_infer", "--model_name_or_path", "unused", "--dataset", "mire_test", "--dataset_dir", ds,
                    "--backend", "vllm", "--compile", "--save_name", tmp_path / "p.jsonl")
    assert proc.returncode == 2 and "--compile is for the hf backend" in proc.stderr


def test_sharded_runs_merged_equal_the_unsharded_run_and_resume(tiny_model_dir, synthetic_dataset, tmp_path):
    from mire_factory.infer.pipeline import run

    ds, ids = synthetic_dataset
    full = run(infer_args(tiny_model_dir, ds, tmp_path / "full.jsonl"))
    rows = read_rows(full)
    assert [r["id"] for r in rows] == ids and all(r["label"] == "" for r in rows)

    for k in range(3):
        run(infer_args(tiny_model_dir, ds, tmp_path / "sharded.jsonl", num_shards=3, shard_index=k))
    merged = run(infer_args(None, ds, tmp_path / "sharded.jsonl", num_shards=3, merge_shards=True))
    merged_rows = read_rows(merged)
    assert [(r["id"], r["predict"], r["prompt"]) for r in merged_rows] == [(r["id"], r["predict"], r["prompt"]) for r in rows]

    # Resume: a run killed after a few lines (the last one cut off) finishes the rest and matches the full run.
    partial = tmp_path / "resumed.jsonl"
    text = full.read_text(encoding="utf-8").splitlines(keepends=True)
    partial.write_text("".join(text[:5]) + text[5][:20], encoding="utf-8")
    run(infer_args(tiny_model_dir, ds, partial))
    assert read_rows(partial) == rows


def test_cot_constrained_answers_are_json_with_a_valid_label(tiny_model_dir, synthetic_dataset, tmp_path):
    from mire_factory.infer.pipeline import run
    from mire_factory.prompts import LABEL_KEY, REASON_KEY

    ds, ids = synthetic_dataset
    save = run(infer_args(tiny_model_dir, ds, tmp_path / "cot.jsonl", constrained=True, answer_format="cot",
                          max_new_tokens=48, batch_size=7))
    rows = read_rows(save)
    assert [r["id"] for r in rows] == ids
    for row in rows:
        answer = json.loads(row["predict"])
        assert list(answer) == [REASON_KEY, LABEL_KEY] and answer[LABEL_KEY] in LABELS[row["task"]], row["predict"]


def test_compile_gives_the_same_answers(tiny_model_dir, synthetic_dataset, tmp_path):
    """--compile: varlen vision attention and a static KV cache (both compiled on CUDA): the answers must not change."""
    from mire_factory.infer.pipeline import run

    ds, ids = synthetic_dataset
    runs = [read_rows(run(infer_args(tiny_model_dir, ds, tmp_path / f"{flag}.jsonl", constrained=True,
                                     compile=flag, batch_size=5)))
            for flag in (False, True)]
    assert [r["id"] for r in runs[1]] == ids
    assert [r["predict"] for r in runs[1]] == [r["predict"] for r in runs[0]]
    assert len({r["predict"] for r in runs[0]}) > 1


def test_varlen_vision_attention_equals_per_image_sdpa(tiny_model_dir, mire_sample):
    """--compile's vision attention (one varlen call per batch on CUDA) gets every image's tokens and cu_seqlens:
    on the 32 real screenshots its features equal transformers' per-image SDPA; the language model keeps SDPA."""
    import torch

    from mire_factory.infer.fast_vision import VARLEN_ATTENTION, speed_up_vision_tower
    from mire_factory.infer.hf_backend import image_inputs, load_hf_model
    from mire_factory.infer.render import load_components

    comp = load_components(str(tiny_model_dir), image_max_pixels=65536)
    model = load_hf_model(comp)
    images = sorted(str(p) for p in (mire_sample / "images").iterdir())
    mm = image_inputs(comp, images)
    assert len(mm["image_grid_thw"]) == 32 and len({tuple(g.tolist()) for g in mm["image_grid_thw"]}) >= 5
    with torch.inference_mode():
        reference = model.model.visual(mm["pixel_values"], grid_thw=mm["image_grid_thw"]).pooler_output
        speed_up_vision_tower(model, compile_blocks=False)
        features = model.model.visual(mm["pixel_values"], grid_thw=mm["image_grid_thw"]).pooler_output
    assert model.model.visual.config._attn_implementation == VARLEN_ATTENTION
    assert model.model.language_model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(features, reference, rtol=1e-5, atol=1e-6)
