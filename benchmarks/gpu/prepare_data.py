"""Real-format benchmark data for the lent GPU: the 24 real MIRE records and their 32 screenshots, converted with
tools.convert into a git-ignored folder that travels with the device call, the train split repeated to make an epoch.

python benchmarks/gpu/prepare_data.py [--sample_dir ../shared/mire_sample] [--out .gpu_data] [--repeat 20]
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
    parser.add_argument("--sample_dir", default=str(REPO.parent / "shared" / "mire_sample"))
    parser.add_argument("--out", default=str(REPO / ".gpu_data"))
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    sample, out = Path(args.sample_dir), Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(sample / "images", out / "images")
    subprocess.run([sys.executable, "-m", "tools.convert", "--input_file", str(sample / "train_sample.json"),
                    "--image_dir", str(out / "images"), "--output_dir", str(out / "mire"), "--val_size", "0.25"],
                   cwd=REPO, check=True)
    train_path = out / "mire" / "mire_train.json"
    train = json.loads(train_path.read_text(encoding="utf-8"))
    repeated = [{**r, "id": f"{r['id']}-r{k}"} for k in range(args.repeat) for r in train]
    train_path.write_text(json.dumps(repeated, ensure_ascii=False), encoding="utf-8")
    exclude = REPO / ".git" / "info" / "exclude"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    if "/.gpu_data/" not in exclude.read_text().splitlines() if exclude.exists() else True:
        with exclude.open("a") as fh:
            fh.write("/.gpu_data/\n")
    print(f"{len(repeated)} train records ({len(train)} x {args.repeat}) in {out / 'mire'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
