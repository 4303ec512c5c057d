"""The README's main job: the demo trains through the real recipe and CLI, and the model learns."""

import csv
import json

import pytest
from PIL import Image

from mire_factory.demo import DemoConfig, run_demo


@pytest.mark.slow
def test_demo_learns(tmp_path):
    summary = run_demo(DemoConfig(workdir=tmp_path / "demo"))
    work = tmp_path / "demo"
    assert summary["trained"]["f1"] >= 0.90, summary
    assert summary["untrained"]["f1"] < 0.5, summary  # near chance before training: the gain is learned
    metrics = json.loads((work / "metrics.json").read_text(encoding="utf-8"))
    assert set(metrics) >= {"overall", "image", "dialogue", "pooled", "per_class"}
    assert metrics["overall"]["f1"] == pytest.approx(summary["trained"]["f1"])
    lines = (work / "trained" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 60 and all(json.loads(line)["id"] for line in lines)
    with open(work / "trained" / "submit.csv", encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 60 and all(row["predict"] for row in rows)
    for png in ("trained/confusion_image.png", "trained/confusion_dialogue.png", "saves/training_loss.png"):
        with Image.open(work / png) as img:
            img.verify()


def test_the_demo_hides_llamafactorys_example_dump_and_nothing_else(capsys):
    """What LLaMA-Factory prints before training (its SupervisedDatasetProcessor.print_data_example on a real
    encoded record, multi-line dialogue prompt included) is dropped from the demo's output; the rest passes."""
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.data.processor.supervised import SupervisedDatasetProcessor
    from llamafactory.hparams import DataArguments

    from mire_factory.demo import ExampleDumpFilter
    from mire_factory.taxonomy import build_dialogue_instruction
    from mire_factory.tiny_model import build_processor, load_qwen2_tokenizer

    tokenizer = load_qwen2_tokenizer()
    data_args = DataArguments(template="qwen2_vl")
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    dumper = SupervisedDatasetProcessor(template=template, tokenizer=tokenizer, processor=build_processor(tokenizer),
                                        data_args=data_args)
    messages = [{"role": "user", "content": build_dialogue_instruction([("用户", "贴膜有气泡怎么办"), ("客服", "")])},
                {"role": "assistant", "content": "气泡"}]
    prompt, answer = template.encode_oneturn(tokenizer, messages)
    example = {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}
    print("[5/7] training")
    print("training example:")
    dumper.print_data_example(example)
    print("{'loss': 11.9, 'epoch': 0.2}")
    print("eval example:")
    dumper.print_data_example(example)
    print("")
    print("done")
    out = capsys.readouterr().out
    assert "input_ids:" in out and str(prompt[:8])[1:-1] in out  # the dump is there to be dropped
    keep = ExampleDumpFilter()
    shown = "".join(line for line in out.splitlines(keepends=True) if keep.keep(line))
    assert shown == "[5/7] training\n{'loss': 11.9, 'epoch': 0.2}\n\ndone\n"


def test_the_demo_trains_in_fp32_through_the_launcher_with_label_logits_only(tmp_path):
    """One arithmetic on every CPU (bf16 ran PyTorch's scalar GEMM on an AVX2-only CPU, and the tiny model's outcome
    moved with the arithmetic); the launcher computes the output layer at the label positions only."""
    import sys

    from mire_factory import demo

    cmd = demo.train_command(DemoConfig(workdir=tmp_path), tmp_path / "m", tmp_path / "d", tmp_path / "o")
    assert cmd[:4] == [sys.executable, "-m", "mire_factory.train", str(demo.RECIPE)]
    assert "bf16=false" in cmd and "mire_label_logits_only=true" in cmd and "deepspeed=null" in cmd
