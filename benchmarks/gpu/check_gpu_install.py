"""Does the GPU install resolve? `pip install --dry-run` of this project with its GPU extras, versions checked.

python benchmarks/gpu/check_gpu_install.py [--extras vllm,deepspeed] [--json_out F.json]

Runs `pip install --dry-run --ignore-installed --report - -e ".[EXTRAS]"` (PyPI needed; a few minutes: pip fetches
the metadata of about 250 packages) and checks that llamafactory 0.9.5, transformers 5.6.0, torch 2.11.0 and vllm
0.24.0 resolve together. Prints the resolved versions of the packages that matter; exit 1 on a mismatch, 2 when pip
cannot resolve or reach the index.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXPECTED = {"llamafactory": "0.9.5", "transformers": "5.6.0", "torch": "2.11.0", "vllm": "0.24.0"}
SHOWN = ["torchvision", "deepspeed", "xgrammar", "tokenizers", "datasets", "accelerate", "peft", "trl", "openai",
         "pydantic", "numpy", "flashinfer-python", "mistral-common"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extras", default="vllm,deepspeed")
    parser.add_argument("--json_out")
    args = parser.parse_args()
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                           "--report", "-", "-e", f".[{args.extras}]"], cwd=REPO, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        print(f"pip could not resolve .[{args.extras}] (exit {proc.returncode}):\n{proc.stderr[-3000:]}",
              file=sys.stderr)
        return 2
    report = json.loads(proc.stdout)
    versions = {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
                for item in report["install"]}
    wrong = {name: versions.get(name) for name, want in EXPECTED.items() if versions.get(name) != want}
    result = {"extras": args.extras, "python": sys.version.split()[0], "pip_seconds": round(elapsed, 1),
              "packages": len(versions), "expected": EXPECTED, "wrong": wrong,
              "resolved": {name: versions.get(name) for name in [*EXPECTED, *SHOWN]}}
    print(json.dumps(result, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
