"""Train and inference prompts of real MIRE records, token for token: convert -> merge_cot -> tools.vllm_infer.

    python -m benchmarks.prompt_identity [--data_dir ../shared/mire_dev] [--prompt_variant cot] [--workdir DIR]

1. the train file is converted with --prompt_variant (default cot), its reasons merged by tools.merge_cot (a
   synthetic reason per record, in the reasons JSONL schema of mire_factory/reasons.py);
2. a copy of the same file with every `output` set to "" is converted as a test set with the same variant;
3. LLaMA-Factory's own get_dataset encodes the merged train file (the tiny model's tokenizer and processor, the full
   SFT recipe's template, cutoff_len and image_max_pixels): the training prompt is each sample's input_ids before its
   first supervised label;
4. tools.vllm_infer runs on the test set (hf backend, the tiny random model, the recipe's settings);
5. per record: the ids tools.vllm_infer's own functions render (planner, LLaMA-Factory template and mm_plugin, image
   tokens expanded) equal the training prompt, and the `prompt` it wrote equals the training prompt decoded with one
   image token per image. Prints the counts; exit 1 when any record differs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

IGNORE_INDEX = -100


def reasons_file(train_rows: list[dict], path: Path) -> Path:
    from mire_factory.answers import extract_answer
    from mire_factory.reasons import ReasonRecord

    lines = []
    for k, row in enumerate(train_rows):
        gold = extract_answer(row["messages"][1]["content"])
        reason = f"第{k + 1}条记录的内容与「{gold}」的定义一致。"
        lines.append(ReasonRecord(id=row["id"], mode=3, model="synthetic", status="ok", reason=reason, label=gold,
                                  gold=gold).to_json())
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def training_prompts(model_dir: Path, data_dir: Path, dataset: str, recipe: dict, out: Path) -> tuple[list, object]:
    """LLaMA-Factory's get_dataset on the train file, as `llamafactory-cli train` runs it: prompt ids per sample."""
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    args = dict(model_name_or_path=str(model_dir), stage="sft", do_train=True, finetuning_type="full",
                template=recipe["template"], dataset=dataset, dataset_dir=str(data_dir),
                cutoff_len=recipe["cutoff_len"], image_max_pixels=recipe["image_max_pixels"], output_dir=str(out),
                overwrite_cache=True, report_to="none", preprocessing_num_workers=1)
    model_args, data_args, training_args, _, _ = get_train_args(args)
    module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(module["tokenizer"], data_args)
    train = get_dataset(template, model_args, data_args, training_args, stage="sft", **module)["train_dataset"]
    prompts = []
    for sample in train:
        start = next(i for i, label in enumerate(sample["labels"]) if label != IGNORE_INDEX)
        prompts.append(list(sample["input_ids"][:start]))
    return prompts, module["tokenizer"]


def inference_ids(model_dir: Path, data_dir: Path, args) -> dict[str, list[int]]:
    """The ids tools.vllm_infer's functions render for each test record (its planner and renderer)."""
    from mire_factory.infer.render import expand_image_tokens, load_components, render_prompt_ids
    from mire_factory.infer.truncation import ImageTokenizer, Planner
    from mire_factory.sharegpt import read_sharegpt

    comp = load_components(str(model_dir), args.template, None, args.image_max_pixels, args.image_min_pixels,
                           args.cutoff_len)
    records = read_sharegpt(args.dataset, data_dir)
    planner = Planner(comp.tokenizer, ImageTokenizer.from_processor(comp.processor),
                      len(render_prompt_ids(comp, "", [])), args.cutoff_len)
    out = {}
    for record, plan in zip(records, planner.plan_many(records), strict=True):
        ids = render_prompt_ids(comp, plan.content, plan.images, record.system)
        out[record.id] = expand_image_tokens(ids, comp.image_pad_id, plan.image_tokens)
    return out


def one_pad_per_image(ids: list[int], pad: int) -> list[int]:
    return [t for k, t in enumerate(ids) if t != pad or k == 0 or ids[k - 1] != pad]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(REPO.parent / "shared" / "mire_dev"),
                        help="a folder with one MIRE train json and its images/ (default: ../shared/mire_dev)")
    parser.add_argument("--prompt_variant", default="cot")
    parser.add_argument("--recipe", default=str(REPO / "configs" / "qwen2_vl_full_sft.yaml"),
                        help="the training settings both sides use (template, cutoff_len, image_max_pixels)")
    parser.add_argument("--workdir", help="default: a temporary directory (the shared data is never written)")
    args = parser.parse_args(argv)
    os.environ.setdefault("DISABLE_VERSION_CHECK", "1")
    import yaml

    from mire_factory.hparams import parse_args
    from mire_factory.infer.args import InferArgs, config_values
    from mire_factory.infer.pipeline import run
    from mire_factory.tiny_model import make_tiny_model
    from tools import convert, merge_cot

    source = Path(args.data_dir)
    train_file = next(p for p in sorted(source.glob("*.json")))
    recipe = yaml.safe_load(Path(args.recipe).read_text(encoding="utf-8"))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        records = json.loads(train_file.read_text(encoding="utf-8"))
        test_file = work / "test.json"
        test_file.write_text(json.dumps([{**r, "output": ""} for r in records], ensure_ascii=False), encoding="utf-8")
        model_dir = make_tiny_model(work / "model", preset="tiny", seed=0)
        data = work / "data"
        variant = ["--prompt_variant", args.prompt_variant]
        convert.main(["--input_file", str(train_file), "--image_dir", str(source / "images"), "--output_dir",
                      str(data), "--val_size", "0", *variant])
        convert.main(["--input_file", str(test_file), "--image_dir", str(source / "images"), "--output_dir", str(data),
                      *variant])
        info = json.loads((data / "dataset_info.json").read_text(encoding="utf-8"))
        assert "mire_test" in info, "the copy with empty outputs did not convert as a test set"
        train_set = "mire_train"
        if info["mire_train"]["mire_prompt_variant"] != "plain":
            rows = json.loads((data / "mire_train.json").read_text(encoding="utf-8"))
            merge_cot.main(["--dataset_file", str(data / "mire_train.json"), "--reasons_file",
                            str(reasons_file(rows, work / "reasons.jsonl")), "--output_file",
                            str(data / "mire_train_cot.json")])
            train_set = "mire_train_cot"
        train_rows = json.loads((data / f"{train_set}.json").read_text(encoding="utf-8"))
        prompts, tokenizer = training_prompts(model_dir, data, train_set, recipe, work / "lf_out")
        assert len(prompts) == len(train_rows), "LLaMA-Factory dropped samples"

        infer_args = parse_args(InferArgs, [
            "--config", args.recipe, "--model_name_or_path", str(model_dir), "--dataset", "mire_test",
            "--dataset_dir", str(data), "--backend", "hf", "--max_new_tokens", "4", "--batch_size", "16",
            "--save_name", str(work / "pred.jsonl"), "--overwrite"], config_values=config_values)
        run(infer_args)
        written = {row["id"]: row for row in map(json.loads, (work / "pred.jsonl").read_text(encoding="utf-8")
                                                 .splitlines())}
        rendered = inference_ids(model_dir, data, infer_args)

        pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        same_ids = same_text = 0
        first_diff = None
        for row, prompt in zip(train_rows, prompts, strict=True):
            ok_ids = rendered.get(row["id"]) == prompt
            text = tokenizer.decode(one_pad_per_image(prompt, pad), skip_special_tokens=False)
            ok_text = written.get(row["id"], {}).get("prompt") == text
            same_ids += ok_ids
            same_text += ok_text
            if not (ok_ids and ok_text) and first_diff is None:
                first_diff = row["id"]
        n = len(train_rows)
        images = sorted({len(r["image"]) for r in records})
        print(f"\nprompt variant {args.prompt_variant}: {n} records ({sum(r['image'] != [] for r in records)} with "
              f"images, {images[0]}-{images[-1]} per record); training file {train_set}, test file mire_test "
              f"(every output \"\")")
        print(f"token-identical train/inference prompts (ids rendered by tools.vllm_infer): {same_ids}/{n}")
        print(f"tools.vllm_infer's written prompt == the training prompt decoded: {same_text}/{n}")
        print(f"{time.perf_counter() - start:.0f} s")
        if first_diff:
            print(f"first record that differs: {first_diff}")
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
