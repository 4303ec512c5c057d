"""Big files to the lent GPU in pieces: each device call carries at most 64 MiB, but files copied outside the working
tree there (e.g. /root/stage) survive between calls while the machine is warm.

Here:    python benchmarks/gpu/chunks.py split FILE [FILE ...] --out .stage [--size_mb 56]
         -> .stage/NAME.partNN pieces and .stage/manifest.json (name, bytes, sha256, pieces)
There:   python3 benchmarks/gpu/chunks.py keep .stage/NAME.partNN [...] --dest /root/stage   (one call per piece)
         python3 benchmarks/gpu/chunks.py join --manifest .stage/manifest.json --dest /root/stage
         -> /root/stage/NAME, each checked against its sha256 (exit 1 naming what is missing or wrong)

Standard library only: it runs under any python3 on either machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

MANIFEST = "manifest.json"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def split(files: list[Path], out: Path, size: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    for path in files:
        pieces = []
        with open(path, "rb") as fh:
            for k, block in enumerate(iter(lambda: fh.read(size), b"")):
                piece = out / f"{path.name}.part{k:02d}"
                piece.write_bytes(block)
                pieces.append(piece.name)
        manifest[path.name] = {"bytes": path.stat().st_size, "sha256": sha256_of(path), "pieces": pieces}
        print(f"{path.name}: {len(pieces)} pieces of <= {size >> 20} MiB")
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return manifest


def keep(pieces: list[Path], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for piece in pieces:
        tmp = dest / (piece.name + ".tmp")
        shutil.copyfile(piece, tmp)
        os.replace(tmp, dest / piece.name)
        print(f"kept {piece.name} ({piece.stat().st_size} bytes) in {dest}")


def join(manifest_path: Path, dest: Path, names: list[str] | None = None) -> int:
    manifest = json.loads(manifest_path.read_text())
    bad = 0
    for name, entry in manifest.items():
        if names and name not in names:
            continue
        target = dest / name
        if target.exists() and target.stat().st_size == entry["bytes"] and sha256_of(target) == entry["sha256"]:
            print(f"{name}: already joined")
            continue
        missing = [p for p in entry["pieces"] if not (dest / p).is_file()]
        if missing:
            print(f"{name}: missing pieces {missing}")
            bad += 1
            continue
        tmp = dest / (name + ".tmp")
        with open(tmp, "wb") as out:
            for piece in entry["pieces"]:
                with open(dest / piece, "rb") as fh:
                    shutil.copyfileobj(fh, out)
        if sha256_of(tmp) != entry["sha256"]:
            print(f"{name}: sha256 mismatch after joining")
            tmp.unlink()
            bad += 1
            continue
        os.replace(tmp, target)
        for piece in entry["pieces"]:
            (dest / piece).unlink()
        print(f"{name}: joined, {entry['bytes']} bytes, sha256 ok")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("split")
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path(".stage"))
    p.add_argument("--size_mb", type=int, default=56,
                   help="piece size: a device call carries at most 64 MiB, the working tree (about 5 MiB) included")
    p = sub.add_parser("keep")
    p.add_argument("pieces", nargs="+", type=Path)
    p.add_argument("--dest", type=Path, default=Path("/root/stage"))
    p = sub.add_parser("join")
    p.add_argument("--manifest", type=Path, default=Path(".stage") / MANIFEST)
    p.add_argument("--dest", type=Path, default=Path("/root/stage"))
    p.add_argument("--names", nargs="*")
    args = parser.parse_args(argv)
    if args.command == "split":
        split(args.files, args.out, args.size_mb << 20)
        return 0
    if args.command == "keep":
        keep(args.pieces, args.dest)
        return 0
    return join(args.manifest, args.dest, args.names)


if __name__ == "__main__":
    sys.exit(main())
