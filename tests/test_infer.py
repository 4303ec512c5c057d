"""tools.vllm_infer end to end with the transformers backend and the tiny random-weight model."""

from __future__ import annotations

import json

import pytest
from test_infer_units import write_sharegpt

from conftest import call_tool, run_tool
from mire_factory.taxonomy import LABELS, is_valid_label


def read_rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def synthetic_dataset(tmp_path_factory):
    from mire_factory.records import load_records
    from mire_factory.synthetic import make_records

    root = tmp_path_factory.mktemp("infer_synthetic")
    (root / "src.json").write_text(json.dumps(make_records(5, 9, root / "src", seed=7, image_size=(96, 64),
                                                           max_dialogue_images=3), ensure_ascii=False), encoding="utf-8")
    records = load_records(root / "src.json", root / "src")
    return write_sharegpt(records, root / "src", root / "ds", with_labels=False), [r.id for r in records]


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

    from mire_factory.infer.render import expand_image_tokens, load_components, render_prompt_ids
    from mire_factory.records import load_records
    from mire_factory.sharegpt import read_sharegpt

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
    records = read_sharegpt("mire_test", ds)
    assert len(train) == len(records) == 24
    for record, row in zip(records, train, strict=True):
        n_prompt = next(i for i, label in enumerate(row["labels"]) if label != -100)
        ids = render_prompt_ids(comp, record.instruction, record.images)
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
    meta = json.loads((tmp_path / "full.jsonl.meta.json").read_text(encoding="utf-8"))
    assert meta["origin"]["cutoff_len"] == 1024 and meta["origin"]["prompt_variant"] == "plain"
    assert meta["origin"]["weights"] and meta["origin"]["model_name_or_path"] == str(tiny_model_dir.resolve())
    (tmp_path / "resumed.jsonl.meta.json").write_text(json.dumps(meta), encoding="utf-8")
    run(infer_args(tiny_model_dir, ds, partial))
    assert read_rows(partial) == rows
    merged_meta = json.loads((tmp_path / "sharded.jsonl.meta.json").read_text(encoding="utf-8"))
    assert merged_meta["origin"] == meta["origin"]


@pytest.fixture(scope="module")
def cot_dataset(tmp_path_factory):
    """A test file converted with the cot prompt variant (definitions and answer format in every user turn)."""
    from mire_factory.convert import convert
    from mire_factory.synthetic import make_records, write_dataset

    root = tmp_path_factory.mktemp("infer_cot")
    records = make_records(5, 9, root / "src", seed=7, image_size=(96, 64), max_dialogue_images=3, with_labels=False)
    write_dataset(root / "test.json", records)
    convert(root / "test.json", root / "src", root / "ds", prompt_variant="cot")
    return root / "ds", [r["id"] for r in records]


def test_cot_constrained_answers_are_json_with_a_valid_label(tiny_model_dir, cot_dataset, tmp_path):
    """The answer format comes from the dataset's prompt variant: no flag to forget."""
    from mire_factory.infer.pipeline import run
    from mire_factory.prompts import LABEL_KEY, REASON_KEY

    ds, ids = cot_dataset
    save = run(infer_args(tiny_model_dir, ds, tmp_path / "cot.jsonl", constrained=True, max_new_tokens=48,
                          batch_size=7))
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


def test_a_resume_must_come_from_the_same_model_and_settings(tiny_model_dir, synthetic_dataset, tmp_path):
    """Rerunning into a file with another model used to keep the old predictions ("0 to predict"): now the
    origin in PRED.meta.json is compared and a different one is refused in one line, unless --overwrite. The tool
    runs in this process (six runs)."""
    import shutil

    from mire_factory.tiny_model import make_tiny_model

    ds, ids = synthetic_dataset
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    save = tmp_path / "p.jsonl"
    base = ["--dataset", "mire_test", "--dataset_dir", ds, "--backend", "hf", "--save_name", save, "--cutoff_len",
            "1024", "--max_new_tokens", "8", "--image_max_pixels", "65536"]
    proc = call_tool("vllm_infer", "--model_name_or_path", model, *base)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = read_rows(save)
    again = call_tool("vllm_infer", "--model_name_or_path", model, *base)  # same origin: a resume with nothing to do
    assert again.returncode == 0 and f"{len(ids)} already in" in again.stdout

    proc = call_tool("vllm_infer", "--model_name_or_path", model, *base[:-6], "--cutoff_len", "2048",
                     *base[-4:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "cutoff_len: 1024 there, 2048 now" in errors[0], proc.stderr
    make_tiny_model(model, preset="tiny", seed=5)  # retrained in place: same path, other weights
    proc = call_tool("vllm_infer", "--model_name_or_path", model, *base)
    assert proc.returncode == 2 and "holds predictions of another model or settings (weights:" in proc.stderr
    assert "--overwrite" in proc.stderr and read_rows(save) == first
    old_weights = json.loads((tmp_path / "p.jsonl.meta.json").read_text(encoding="utf-8"))["origin"]["weights"]
    proc = call_tool("vllm_infer", "--model_name_or_path", model, *base, "--overwrite")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"0 already in {save}" in proc.stdout and [r["id"] for r in read_rows(save)] == ids
    new_weights = json.loads((tmp_path / "p.jsonl.meta.json").read_text(encoding="utf-8"))["origin"]["weights"]
    assert new_weights != old_weights
    (tmp_path / "p.jsonl.meta.json").unlink()  # a file with no record of its origin is not resumed either
    proc = call_tool("vllm_infer", "--model_name_or_path", model, *base)
    assert proc.returncode == 2 and "no record of what made them" in proc.stderr


def test_an_undecodable_image_is_a_failed_row_not_a_failed_batch(tiny_model_dir, tmp_path, capsys):
    """A truncated JPEG fails only its record (field `error`), the batch is generated, a rerun has nothing left to
    do, and downstream tools count the row as an invalid answer."""
    from PIL import Image

    from mire_factory.convert import convert
    from mire_factory.infer.pipeline import run
    from mire_factory.io import run_cli
    from mire_factory.synthetic import make_records, write_dataset
    from tools import convert2submit

    records = make_records(4, 4, tmp_path / "src", seed=3, max_dialogue_images=1, image_format="JPEG")
    write_dataset(tmp_path / "gold.json", records)
    write_dataset(tmp_path / "test.json", [{**r, "output": ""} for r in records])
    convert(tmp_path / "test.json", tmp_path / "src", tmp_path / "ds")
    bad = next(r for r in records if r["image"])
    path = tmp_path / "src" / bad["image"][0]
    Image.new("RGB", (300, 300), (10, 200, 30)).save(path, format="JPEG")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # the header reads, the pixels do not
    save = run(infer_args(tiny_model_dir, tmp_path / "ds", tmp_path / "p.jsonl", batch_size=8))
    assert "planned 8 prompts" in capsys.readouterr().out  # it fails while its batch is prepared, not before
    rows = {r["id"]: r for r in read_rows(save)}
    assert len(rows) == 8 and "truncated" in rows[bad["id"]]["error"] and rows[bad["id"]]["predict"] == ""
    assert all("error" not in r and r["prompt"] for rid, r in rows.items() if rid != bad["id"])
    capsys.readouterr()
    run(infer_args(tiny_model_dir, tmp_path / "ds", tmp_path / "p.jsonl", batch_size=8))
    out = capsys.readouterr().out
    assert "8 already in" in out and "1 of them failed; --retry_failed" in out and "0 to predict" in out
    with pytest.raises(SystemExit) as exit_info:
        run_cli(convert2submit.main, ["--test_file", str(tmp_path / "test.json"), "--prediction_file", str(save),
                                      "--save_path", str(tmp_path / "s.csv")])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "failed 1" in out and f"1 predictions failed at inference, e.g. {bad['id']}" in out
