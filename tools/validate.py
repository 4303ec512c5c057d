"""Check a MIRE json file: python -m tools.validate --input_file F --image_dir D [--kind auto|train|test] [--quick]

Every image is decoded (a truncated file passes a header check and then fails training or inference); --quick reads
headers only. The file is train (every record has a gold `output`) or test (none has: absent, null or ""); `auto`
decides for the whole file, and a mix is an error naming the first record of the smaller group."""

from __future__ import annotations

from dataclasses import dataclass, field

from mire_factory.convert_args import ImageCheckArguments
from mire_factory.hparams import config_field, parse_args
from mire_factory.io import run_cli
from mire_factory.records import KINDS, read_mire_file, summarize


@dataclass(kw_only=True)
class ValidateArguments(ImageCheckArguments):
    input_file: str = field(metadata={"help": "MIRE json"})
    image_dir: str = field(metadata={"help": "folder of the images"})
    kind: str = field(default="auto", metadata={
        "help": "train: every record needs `output`; test: labels optional; auto: decided by the file",
        "choices": list(KINDS)})
    config: str | None = config_field()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(ValidateArguments, argv, __doc__)
    mire = read_mire_file(args.input_file, args.image_dir, kind=args.kind, decode_images=not args.quick)
    print(f"ok: {args.input_file}: {mire.kind} file, {summarize(mire.records)}"
          + (" (image headers only: --quick)" if args.quick else ""))
    return 0


if __name__ == "__main__":
    run_cli(main)
