"""Check a MIRE json file: python -m tools.validate --input_file F --image_dir D [--kind auto|train|test] [--quick]

Every image is decoded (a truncated file passes a header check and then fails training or inference); --quick reads
headers only. The file is train (every record has a gold `output`) or test (none has: absent, null or ""); `auto`
decides for the whole file, and a mix is an error naming the first record of the smaller group."""

from __future__ import annotations

import argparse

from mire_factory.io import run_cli
from mire_factory.records import KINDS, read_mire_file, summarize


def add_image_check_flags(parser: argparse.ArgumentParser) -> None:
    """--quick, and --verify_images kept as a no-op for scripts written when decoding was optional."""
    parser.add_argument("--quick", action="store_true", help="read image headers only, do not decode the images")
    parser.add_argument("--verify_images", action="store_true",
                        help="no-op, kept for old scripts: images are decoded by default (see --quick)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_file", required=True)
    parser.add_argument("--image_dir", required=True)
    parser.add_argument("--kind", choices=KINDS, default="auto",
                        help="train: every record needs `output`; test: labels optional; auto: decided by the file")
    add_image_check_flags(parser)
    args = parser.parse_args(argv)
    mire = read_mire_file(args.input_file, args.image_dir, kind=args.kind, decode_images=not args.quick)
    print(f"ok: {args.input_file}: {mire.kind} file, {summarize(mire.records)}"
          + (" (image headers only: --quick)" if args.quick else ""))
    return 0


if __name__ == "__main__":
    run_cli(main)
