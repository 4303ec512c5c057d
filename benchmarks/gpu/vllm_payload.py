"""One payload for the vLLM session on the lent GPU: wheels and data in a tar.xz, split into <= 56 MiB pieces.

python benchmarks/gpu/vllm_payload.py [--wheels .whl .whl_vllm] [--data .gpu_data/vllm] [--out .stage/vllm]
    [--size_mb 56] [--preset 6]

- Every wheel is rewritten uncompressed (ZIP_STORED, the same files and RECORD, so pip installs it as before) and the
  tar of them is xz-compressed: vLLM's wheel goes from 279 MB (deflate) to about 207 MB, one device call fewer.
- The data folder (prepare_vllm_data.py: raw MIRE json and screenshots) goes in as it is, under data/.
- The tar.xz is split with chunks.py: OUT/payload.tar.xz.partNN and OUT/manifest.json (sha256).
- OUT/PLAN.md lists the device calls, in order, with what each carries.
Standard library only (and the `xz` program when there is one: it compresses on every core).
"""

from __future__ import annotations

import argparse
import lzma
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

import chunks  # noqa: E402

PAYLOAD = "payload.tar.xz"


def stored_wheel(src: Path, dst: Path) -> None:
    """The same wheel with every member stored uncompressed (xz then compresses the whole tar far better)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            out = zipfile.ZipInfo(info.filename, info.date_time)
            out.external_attr, out.compress_type = info.external_attr, zipfile.ZIP_STORED
            zout.writestr(out, zin.read(info))


def build_tar(wheels: list[Path], data: Path | None, tar_path: Path, tmp: Path) -> list[tuple[str, int]]:
    listing = []
    with tarfile.open(tar_path, "w") as tar:
        for wheel in wheels:
            stored = tmp / wheel.name
            stored_wheel(wheel, stored)
            tar.add(stored, arcname=f"wheels/{wheel.name}")
            listing.append((wheel.name, wheel.stat().st_size))
            stored.unlink()
        if data is not None:
            # the raw files only: the session converts them with the code it runs
            tar.add(data, arcname="data",
                    filter=lambda ti: None if ti.name == "data/mire" or ti.name.startswith("data/mire/") else ti)
            listing.append((f"data/ ({data})", sum(f.stat().st_size for f in data.rglob("*") if f.is_file())))
    return listing


def compress(tar_path: Path, out: Path, preset: int) -> None:
    if shutil.which("xz"):
        with open(out, "wb") as fh:
            subprocess.run(["xz", "-T0", f"-{preset}", "-c", str(tar_path)], stdout=fh, check=True)
        return
    with open(tar_path, "rb") as src, lzma.open(out, "wb", preset=preset) as dst:
        shutil.copyfileobj(src, dst, 1 << 22)


def plan_text(manifest: dict, listing: list[tuple[str, int]], out: Path) -> str:
    entry = manifest[PAYLOAD]
    rel = out.relative_to(REPO) if out.is_relative_to(REPO) else out
    lines = [f"# vLLM payload: {entry['bytes'] / 2**20:.1f} MiB in {len(entry['pieces'])} pieces "
             f"(sha256 {entry['sha256'][:16]}...)", "", "Contents (sizes as downloaded):", ""]
    lines += [f"- {name}: {size / 1e6:.2f} MB" for name, size in sorted(listing, key=lambda x: -x[1])]
    lines += ["", "Device calls, back to back (each within 30 s of the last, or /root/stage is gone):", ""]
    pieces = entry["pieces"]
    for k, piece in enumerate(pieces, start=1):
        size = (out / piece).stat().st_size / 2**20
        if k < len(pieces):
            lines.append(f"{k}. carry [\"{rel}/{piece}\"] ({size:.1f} MiB): "
                         f"`bash benchmarks/gpu/vllm_session.sh keep {rel}/{piece}`")
        else:
            lines.append(f"{k}. carry [\"{rel}/{piece}\", \"{rel}/manifest.json\"] ({size:.1f} MiB): "
                         f"`bash benchmarks/gpu/vllm_session.sh install {rel}/{piece} && "
                         f"bash benchmarks/gpu/vllm_session.sh bg:check,speed_hf,speed_vllm,serve`")
    lines.append(f"{len(pieces) + 1}. and on, at once each time: "
                 "`bash benchmarks/gpu/vllm_session.sh wait:check,speed_hf,speed_vllm,serve` until it prints bg-done "
                 "(benchmarks/gpu/VLLM.md)")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheels", nargs="+", type=Path, default=[REPO / ".whl", REPO / ".whl_vllm"])
    parser.add_argument("--data", type=Path, default=REPO / ".gpu_data" / "vllm")
    parser.add_argument("--no_data", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / ".stage" / "vllm")
    parser.add_argument("--size_mb", type=int, default=56,
                        help="piece size: a device call carries at most 64 MiB, the working tree (about 5 MiB) included")
    parser.add_argument("--preset", type=int, default=6, help="xz preset (0-9)")
    args = parser.parse_args()
    wheels = sorted(w for folder in args.wheels for w in folder.glob("*.whl"))
    names = [w.name.split("-")[0].lower() for w in wheels]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        print(f"two versions of {twice}: keep one (pip --no-deps --target would install both)", file=sys.stderr)
        return 2
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        tar_path = Path(tmp) / "payload.tar"
        listing = build_tar(wheels, None if args.no_data else args.data, tar_path, Path(tmp))
        print(f"tar: {tar_path.stat().st_size / 2**20:.1f} MiB; compressing (xz -{args.preset})", flush=True)
        compress(tar_path, Path(tmp) / PAYLOAD, args.preset)
        manifest = chunks.split([Path(tmp) / PAYLOAD], args.out, args.size_mb << 20)
    plan = plan_text(manifest, listing, args.out)
    (args.out / "PLAN.md").write_text(plan, encoding="utf-8")
    print(plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())

