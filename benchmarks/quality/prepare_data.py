"""The quality harness's split: `tools.convert`'s deterministic stratified split (by task and label) of the real
records in ../shared/mire_dev, written as two MIRE files with their images in one self-contained, git-ignored folder
that a device call carries whole (the lent GPU has no ../shared).

python benchmarks/quality/prepare_data.py [--dev_dir ../shared/mire_dev] [--out .gpu_data/quality]
    [--test_size 0.2] [--seed 42] [--image_max_pixels 589824]
-> OUT/train.json, OUT/test.json (MIRE records as in train_dev.json, gold labels kept), OUT/images/ (only the
   images they name), OUT/split.json (counts per task and label, and the training tokens per epoch as the recipe
   renders them: mire_factory.recipe_sizing)

The folder is staged beside OUT and renamed into place, so it is whole or absent.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mire_factory.io import MireInputError, problem, run_cli, write_json_atomic  # noqa: E402


def tokens_per_epoch(train_file: Path, image_dir: Path, image_max_pixels: int) -> dict:
    """Prompt + answer tokens of one epoch of the train split, as LLaMA-Factory renders them for training."""
    from mire_factory.recipe_sizing import measure
    from mire_factory.records import load_records

    lengths = measure(load_records(train_file, image_dir, kind="train"), image_dir, image_max_pixels)
    out = {"image_max_pixels": image_max_pixels}
    for task in ("image", "dialogue"):
        sel = [x for x in lengths if x.task == task]
        out[task] = {"records": len(sel), "tokens": sum(x.total_tokens for x in sel),
                     "image_tokens": sum(x.image_tokens for x in sel),
                     "max_tokens": max((x.total_tokens for x in sel), default=0)}
    out["tokens"] = out["image"]["tokens"] + out["dialogue"]["tokens"]
    return out


def prepare(dev_dir: Path, out: Path, test_size: float, seed: int, image_max_pixels: int | None) -> dict:
    from tools import convert as convert_tool

    source, images = dev_dir / "train_dev.json", dev_dir / "images"
    raw = json.loads(source.read_text(encoding="utf-8")) if source.is_file() else None
    if not isinstance(raw, list):
        raise MireInputError(problem(source, None, None, "missing, or not a JSON list of MIRE records"))
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists() else None))
    try:
        # the project's own split: tools.convert --val_size test_size --seed seed (mire_val becomes the test split)
        code = convert_tool.main(["--input_file", str(source), "--image_dir", str(images), "--output_dir",
                                  str(staging / "converted"), "--val_size", str(test_size), "--seed", str(seed)])
        if code:
            raise SystemExit(code)
        ids = {name: [row["id"] for row in json.loads((staging / "converted" / f"mire_{name}.json").read_text(
            encoding="utf-8"))] for name in ("train", "val")}
        shutil.rmtree(staging / "converted")
        by_id = {r["id"]: r for r in raw}
        splits = {"train": [by_id[i] for i in ids["train"]], "test": [by_id[i] for i in ids["val"]]}
        (staging / "images").mkdir()
        for records in splits.values():
            for record in records:
                for name in record["image"]:
                    shutil.copy2(images / name, staging / "images" / name)
        from mire_factory.taxonomy import task_of_label

        summary = {"source": str(source), "test_size": test_size, "seed": seed, "splits": {}}
        for name, records in splits.items():
            write_json_atomic(staging / f"{name}.json", records)
            labels = Counter((task_of_label(r["output"]), r["output"]) for r in records)
            summary["splits"][name] = {
                "records": len(records),
                "tasks": dict(Counter(t for t, _ in labels.elements())),
                "images": sum(len(r["image"]) for r in records),
                "labels": {f"{t}/{label}": n for (t, label), n in sorted(labels.items())},
            }
        if image_max_pixels:
            summary["train_tokens_per_epoch"] = tokens_per_epoch(staging / "train.json", staging / "images",
                                                                 image_max_pixels)
        write_json_atomic(staging / "split.json", summary)
        os.chmod(staging, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dev_dir", type=Path, default=REPO.parent / "shared" / "mire_dev")
    parser.add_argument("--out", type=Path, default=REPO / ".gpu_data" / "quality")
    parser.add_argument("--test_size", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--image_max_pixels", type=int, default=589824,
                        help="for the tokens-per-epoch estimate (the recipe's); 0 skips it")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = prepare(args.dev_dir, args.out, args.test_size, args.seed, args.image_max_pixels)
    for name, split in summary["splits"].items():
        print(f"{name}: {split['records']} records {split['tasks']}, {split['images']} images")
    if "train_tokens_per_epoch" in summary:
        t = summary["train_tokens_per_epoch"]
        print(f"train tokens per epoch at image_max_pixels {t['image_max_pixels']}: {t['tokens']:,} "
              f"(image records {t['image']['tokens']:,}, dialogues {t['dialogue']['tokens']:,}; image tokens "
              f"{t['image']['image_tokens'] + t['dialogue']['image_tokens']:,})")
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {args.out} ({size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    run_cli(main)
