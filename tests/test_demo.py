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
