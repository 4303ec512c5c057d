"""Real-format data for the vLLM measurements on the lent GPU (issue 22), in a git-ignored folder.

python benchmarks/gpu/prepare_vllm_data.py [--dev_dir ../shared/mire_dev] [--sample_dir ../shared/mire_sample]
    [--out .gpu_data/vllm] [--convert]

Writes OUT/images/ (mire_dev's 625 screenshots, already resized to <= 589,824 px) and OUT/images/full/ (mire_sample's
32 full-size screenshots), and two MIRE json files over the same 623 records: the 599 of mire_dev, and mire_sample's
24 again (they are also in mire_dev) with their full-size screenshots and ids ending in `-full`:
- OUT/test.json: without `output`, so that tools.convert makes a test split (`mire_test`);
- OUT/labelled.json: with the gold labels, the test file tools.cal_acc scores against.
--convert also runs tools.convert into OUT/mire (the GPU session does that itself, with the code it runs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dev_dir", default=str(REPO.parent / "shared" / "mire_dev"))
    parser.add_argument("--sample_dir", default=str(REPO.parent / "shared" / "mire_sample"))
    parser.add_argument("--out", default=str(REPO / ".gpu_data" / "vllm"))
    parser.add_argument("--convert", action="store_true")
    args = parser.parse_args()
    dev, sample, out = Path(args.dev_dir), Path(args.sample_dir), Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(dev / "images", out / "images")
    shutil.copytree(sample / "images", out / "images" / "full")
    dev_rows = json.loads((dev / "train_dev.json").read_text(encoding="utf-8"))
    sample_rows = json.loads((sample / "train_sample.json").read_text(encoding="utf-8"))
    full = [{**r, "id": f"{r['id']}-full", "image": [f"full/{name}" for name in r["image"]]} for r in sample_rows]
    labelled = dev_rows + full
    test = [{k: v for k, v in r.items() if k != "output"} for r in labelled]
    for name, rows in (("labelled.json", labelled), ("test.json", test)):
        (out / name).write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    images = sum(len(r["image"]) for r in labelled)
    print(f"{len(labelled)} records ({len(dev_rows)} mire_dev + {len(full)} mire_sample at full size), {images} images "
          f"-> {out}")
    if args.convert:
        subprocess.run([sys.executable, "-m", "tools.convert", "--input_file", str(out / "test.json"),
                        "--image_dir", str(out / "images"), "--output_dir", str(out / "mire")], cwd=REPO, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
