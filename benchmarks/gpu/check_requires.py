"""On the lent GPU, after `pip install --no-deps --target SITE`: are the carried packages' requirements met by what is
importable there (SITE first, then the machine's own packages)? --no-deps checks nothing, so this does.

python3 benchmarks/gpu/check_requires.py --site /tmp/site [--json_out F.json]

Lists, for every distribution installed in SITE, each requirement (extras and other platforms left out) that is
missing or whose installed version is outside the specifier. Missing optional pieces we left out on purpose
(flashinfer, mistral-common, ...) are listed as such. Always exits 0: the list is for reading.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import metadata
from pathlib import Path

LEFT_OUT = {"flashinfer-python", "flashinfer-cubin", "mistral-common", "tilelang", "nvidia-cutlass-dsl",
            "quack-kernels", "tokenspeed-mla", "humming-kernels", "nvidia-cudnn-frontend", "fastsafetensors",
            "anthropic", "mcp", "opentelemetry-sdk", "opentelemetry-api", "opentelemetry-exporter-otlp",
            "opentelemetry-semantic-conventions-ai", "cuda-tile", "torch-c-dlpack-ext", "z3-solver", "jsonschema",
            "fastapi-cli", "fastapi-cloud-cli", "email-validator", "httptools", "python-multipart", "websockets",
            "sse-starlette", "pydantic-settings", "python-dotenv"}


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def main() -> int:
    from packaging.requirements import Requirement

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--site", default="/tmp/site")
    parser.add_argument("--json_out")
    args = parser.parse_args()
    installed = {}
    for dist in metadata.distributions():  # sys.path order: SITE (on PYTHONPATH) wins
        installed.setdefault(canonical(dist.metadata["Name"]), dist.version)
    carried = [d for d in metadata.distributions(path=[args.site])]
    problems, left_out = [], set()
    for dist in carried:
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            name = canonical(req.name)
            have = installed.get(name)
            if have is None:
                (left_out.add(name) if name in LEFT_OUT else
                 problems.append(f"{dist.metadata['Name']} {dist.version} needs {spec}: not installed"))
            elif req.specifier and not req.specifier.contains(have, prereleases=True):
                problems.append(f"{dist.metadata['Name']} {dist.version} needs {spec}: {have} installed")
    result = {"carried": len(carried), "problems": problems, "left_out_on_purpose": sorted(left_out)}
    print(json.dumps(result, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
