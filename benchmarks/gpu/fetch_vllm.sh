#!/usr/bin/env bash
# Downloads, on a machine with PyPI, vLLM 0.24.0 and only the packages the lent GPU machine lacks for it, then builds
# the session's payload (benchmarks/gpu/vllm_payload.py: wheels + data, xz, <= 60 MiB pieces in .stage/vllm/, and
# .stage/vllm/PLAN.md, the device calls in order). Also runs fetch_wheels.sh (.whl/: llamafactory 0.9.5,
# transformers 5.6.0, ...) and prepare_vllm_data.py (.gpu_data/vllm/) when their folders are missing.
#   bash benchmarks/gpu/fetch_vllm.sh            # PY=... to choose the python (default .venv/bin/python)
#
# The list below is vLLM's Requires-Dist closure (resolved together with llamafactory 0.9.5 and deepspeed 0.18.4 by
# benchmarks/gpu/check_gpu_install.py), minus what the machine's image has (KINDS.md) and what .whl brings, minus:
# - flashinfer-python, flashinfer-cubin (447 MB): an optional sampler and kernels; VLLM_USE_FLASHINFER_SAMPLER=0;
# - mistral-common (+ pydantic-extra-types, pycountry, jsonschema): only Mistral models use it. Carried without
#   jsonschema (the first H200 run did), it breaks transformers 5.6.0: Qwen2VLProcessor's class check imports
#   MistralCommonBackend, that import fails, and LLaMA-Factory loads no processor (reproduced on the CPU machine; with
#   jsonschema, as `pip install -e ".[vllm]"` installs it, it loads);
# - tilelang (+ z3-solver), nvidia-cutlass-dsl* (+ cuda-python), quack-kernels, tokenspeed-mla (+ tokenspeed-triton),
#   humming-kernels (+ pyelftools), cuda-tile, nvidia-cuda-nvcc/-nvvm/-crt/-cccl/-tileiras, nvidia-cudnn-frontend,
#   fastsafetensors, torch-c-dlpack-ext: kernels for other chips, MoE, MLA, FP8 and loaders that vLLM imports only on
#   those paths (about 500 MB; vLLM's Hopper attention is its own FlashAttention 3 in the wheel);
# - anthropic, mcp, opentelemetry-*, fastapi-cli/-cloud-cli, email-validator, sse-starlette, websockets, httptools,
#   python-multipart, pydantic-settings, cryptography: server extras that vLLM imports lazily (Anthropic API, tool
#   servers, tracing, CLI sugar). Checked on the CPU machine: `import vllm`, LLM, AsyncLLM, the Qwen2-VL model module,
#   the GPU worker and model runner, the four structured-output backends and `vllm serve`'s app (build_app) import
#   with this set and the machine's packages, with those modules blocked.
# Added by hand (a first H200 run): xgrammar 0.2.3 (0.2.9 fails against apache-tvm-ffi 0.1.9), and httpx2,
# httpcore2, truststore (openai 3.x), interegular (lm-format-enforcer).
set -euo pipefail
cd "$(dirname "$0")/../.."
# .whl/, .whl_vllm/, .gpu_data/ and .stage/ are in .gitignore: device calls carry them as ignored paths
PY=${PY:-python3}
[ "$PY" = python3 ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
[ -d .whl ] || PY=$PY bash benchmarks/gpu/fetch_wheels.sh
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux_2_31_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64)
VLLM=(
  vllm==0.24.0
  # engine, scheduler, multimodal hashing and IPC
  blake3==1.0.11 cachetools==8.0.2 cbor2==6.3.0 msgspec==0.23.0 pyzmq==27.3.0 setproctitle==1.3.8 pybase64==1.5.1
  compressed-tensors==0.17.0 loguru==0.7.3 depyf==0.20.0 astor==0.8.1 diskcache==5.6.3 ijson==3.6.0
  partial-json-parser==0.2.1.1.post7 python-json-logger==4.2.0 openai-harmony==0.0.8 lark==1.2.2
  # structured outputs: xgrammar (the default backend), guidance, outlines, lm-format-enforcer
  xgrammar==0.2.3 apache-tvm-ffi==0.1.9 llguidance==1.7.6 outlines-core==0.2.14 lm-format-enforcer==0.11.3
  interegular==0.3.3
  # vllm serve, and the openai client that tools.distill uses
  fastapi==0.136.3 starlette==1.10.0 uvicorn==0.50.1 watchfiles==1.3.0 prometheus-fastapi-instrumentator==8.1.0
  model-hosting-container-standards==0.1.16 jmespath==1.1.0 supervisor==4.3.0
  openai==3.57.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 jiter==0.19.0 sniffio==1.3.1
)
rm -rf .whl_vllm && mkdir -p .whl_vllm
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
  -d .whl_vllm "${VLLM[@]}"
[ -d .gpu_data/vllm ] || $PY benchmarks/gpu/prepare_vllm_data.py
ls -l .whl .whl_vllm | awk '/\.whl$/ {printf "%9.2f MB  %s\n", $5 / 1e6, $9}' | sort -rn
$PY benchmarks/gpu/vllm_payload.py "$@"
