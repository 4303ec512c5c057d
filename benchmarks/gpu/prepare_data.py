"""Real-format benchmark data for the lent GPU: the 24 real MIRE records and their 32 screenshots, converted with
tools.convert into a git-ignored folder that travels with the device call, the train split repeated to make an epoch.

python benchmarks/gpu/prepare_data.py [--sample_dir ../shared/mire_sample] [--out .gpu_data] [--repeat 20]

Also registers `mire_long`: the sample's dialogue with the most screenshots, given more user screenshot turns
(the sample's largest screenshots) up to --long_images images, the length of the longest dialogues of the full
train set (11 images, ~9.7k tokens): what the recipes' peak memory must survive.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def write_long(out: Path, train: list[dict], n_images: int, copies: int = 64) -> None:
    from PIL import Image

    from mire_factory.taxonomy import DIALOGUE_FOOTER

    record = max((r for r in train if DIALOGUE_FOOTER in r["messages"][0]["content"]), key=lambda r: len(r["images"]))
    pixels = {path: Image.open(out / "images" / Path(path).name).size for r in train for path in r["images"]}
    largest = sorted(pixels, key=lambda p: -pixels[p][0] * pixels[p][1])
    extra = [path for path in largest if path not in record["images"]][: n_images - len(record["images"])]
    content = record["messages"][0]["content"].replace(
        DIALOGUE_FOOTER, "".join("用户: <image>\n" for _ in extra) + DIALOGUE_FOOTER)
    long = {**record, "messages": [{**record["messages"][0], "content": content}, record["messages"][1]],
            "images": record["images"] + extra}
    rows = [{**long, "id": f"{record['id']}-long{k}"} for k in range(copies)]
    (out / "mire" / "mire_long.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    info_path = out / "mire" / "dataset_info.json"
    info = json.loads(info_path.read_text(encoding="utf-8"))
    info["mire_long"] = {**info["mire_train"], "file_name": "mire_long.json"}
    info_path.write_text(json.dumps(info, ensure_ascii=False, indent=2), encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sample_dir", default=str(REPO.parent / "shared" / "mire_sample"))
    parser.add_argument("--out", default=str(REPO / ".gpu_data"))
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--long_images", type=int, default=11)
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
    write_long(out, train, args.long_images)
    exclude = REPO / ".git" / "info" / "exclude"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    if "/.gpu_data/" not in exclude.read_text().splitlines() if exclude.exists() else True:
        with exclude.open("a") as fh:
            fh.write("/.gpu_data/\n")
    print(f"{len(repeated)} train records ({len(train)} x {args.repeat}) in {out / 'mire'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
