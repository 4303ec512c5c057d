"""Times `python -m tools.convert` on synthetic MIRE data with real screenshot sizes.

python -m benchmarks.bench_convert [--n_records 10000] [--verify_images] [--workdir DIR] [--keep]

Half image-scene records, half dialogues with 0-4 images (official instruction texts). A handful of distinct
screenshot-sized JPEGs (~1170x2532) are generated once and hard-linked under one name per image, so generating
10,000 records is cheap while every record has its own files, as in the real data. The page cache is warm (the
files were just written): the figure is CPU cost, not a cold disk. Prints wall time and user+sys CPU of the tool.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

from mire_factory.synthetic import _AGENT_REPLIES, _OPENERS, DEFAULT_IMAGE_CLASSES, DIALOGUE_PHRASES
from mire_factory.taxonomy import DIALOGUE_LABELS, IMAGE_INSTRUCTION, build_dialogue_instruction

REPO = Path(__file__).resolve().parents[1]
SCREEN_SIZES = [(1170, 2532), (1179, 2556), (1284, 2778), (1080, 2400), (1242, 2688), (720, 1280)]


def make_screenshot(size: tuple[int, int], rng: random.Random) -> Image.Image:
    """Bars of text-like noise on a light background: compresses like a real app screenshot."""
    width, height = size
    img = Image.new("RGB", size, (245, 245, 245))
    draw = ImageDraw.Draw(img)
    y = 0
    while y < height:
        h = rng.randint(30, 120)
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        draw.rectangle([rng.randint(0, 60), y, rng.randint(width // 2, width), y + h // 3], fill=colour)
        for _ in range(20):
            x = rng.randint(0, width)
            draw.text((x, y + h // 2), "订单物流退款" + str(rng.randint(0, 99999)), fill=(30, 30, 30))
        y += h
    return img


def generate(root: Path, n_records: int, seed: int = 0) -> tuple[Path, Path]:
    rng = random.Random(seed)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    masters = []
    for k, size in enumerate(SCREEN_SIZES):
        path = root / f"master-{k}.jpg"
        make_screenshot(size, rng).save(path, format="JPEG", quality=85)
        masters.append(path)

    def place(name: str) -> str:
        src = rng.choice(masters)
        try:
            os.link(src, images / name)
        except OSError:  # file systems without hard links
            shutil.copyfile(src, images / name)
        return name

    records = []
    for i in range(n_records):
        rid = f"bench-{i:06d}"
        if i % 2 == 0:
            records.append({"id": rid, "instruction": IMAGE_INSTRUCTION, "input": "",
                            "output": rng.choice(DEFAULT_IMAGE_CLASSES), "image": [place(f"{rid}-0.jpg")]})
            continue
        label = rng.choice(DIALOGUE_LABELS)
        turns = [("用户", rng.choice(_OPENERS)), ("客服", rng.choice(_AGENT_REPLIES))]
        names = []
        for k in range(rng.choice([0, 0, 1, 1, 1, 2, 3, 4])):
            names.append(place(f"{rid}-{k}.jpg"))
            turns += [("用户", "<image>"), ("客服", rng.choice(_AGENT_REPLIES))]
        for _ in range(rng.randint(1, 6)):
            turns += [("用户", rng.choice(DIALOGUE_PHRASES[rng.choice(DIALOGUE_LABELS)])),
                      ("客服", rng.choice(_AGENT_REPLIES))]
        turns += [("用户", rng.choice(DIALOGUE_PHRASES[label])), ("客服", "")]
        records.append({"id": rid, "instruction": build_dialogue_instruction(turns), "input": "", "output": label,
                        "image": names})
    train = root / "train.json"
    train.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return train, images


def time_convert(train: Path, images: Path, out: Path, verify: bool) -> tuple[float, float, str]:
    """(wall seconds, user+sys CPU seconds of the tool process, its stdout)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "tools.convert", "--input_file", str(train), "--image_dir", str(images),
         "--output_dir", str(out), *([] if verify else ["--quick"])],
        cwd=REPO, capture_output=True, text=True,
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"tools.convert failed ({proc.returncode}):\n{proc.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n_records", type=int, default=10000)
    parser.add_argument("--verify_images", action="store_true",
                        help="time the default full decode as well (tools.convert's default; --quick reads headers)")
    parser.add_argument("--workdir", default=None, help="default: a temp folder, removed afterwards")
    parser.add_argument("--keep", action="store_true", help="keep the generated data")
    args = parser.parse_args(argv)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    try:
        t0 = time.perf_counter()
        train, images = generate(root, args.n_records)
        n_images = sum(len(r["image"]) for r in json.loads(train.read_text(encoding="utf-8")))
        print(f"generated {args.n_records} records, {n_images} screenshot-sized JPEGs in "
              f"{time.perf_counter() - t0:.1f} s ({root})")
        modes = [False] + ([True] if args.verify_images else [])
        for verify in modes:
            wall, cpu, stdout = time_convert(train, images, root / ("out_verify" if verify else "out"), verify)
            assert f"{args.n_records - round(args.n_records * 0.1)} records" in stdout.splitlines()[0], stdout
            label = "default (every image decoded, thread pool)" if verify else "--quick (image headers only)"
            print(f"tools.convert, {args.n_records} records / {n_images} images, {label}: "
                  f"{wall:.2f} s wall, {cpu:.2f} s user+sys CPU ({os.cpu_count()} cores visible)")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
