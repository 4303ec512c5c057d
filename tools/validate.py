"""Check a MIRE json file: python -m tools.validate --input_file F --image_dir D"""

from __future__ import annotations

import argparse

from mire_factory.io import run_cli
from mire_factory.records import load_records, summarize


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--input_file", required=True)
    parser.add_argument("--image_dir", required=True)
    parser.add_argument("--kind", choices=["auto", "train", "test"], default="auto", help="train files need `output`")
    parser.add_argument("--verify_images", action="store_true", help="decode every image fully, not only its header")
    args = parser.parse_args(argv)
    records = load_records(args.input_file, args.image_dir, kind=args.kind, verify_images=args.verify_images)
    print(f"ok: {args.input_file}: {summarize(records)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
