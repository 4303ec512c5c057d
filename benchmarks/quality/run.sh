#!/usr/bin/env bash
# The quality harness on the lent GPU machine, from the repo root. Everything big waits in $STAGE (/root/stage),
# outside the working tree, which survives between calls while the machine is warm. benchmarks/quality/README.md
# gives the whole call sequence.
#   bash benchmarks/quality/run.sh install            # the carried .whl kit -> /tmp/site
#   bash benchmarks/quality/run.sh keep .stage/NAME.partNN ...   # GGUF pieces -> $STAGE (one call per piece)
#   bash benchmarks/quality/run.sh unpack MANIFEST [NAME]         # or: one chunked tar of kit, data and GGUF
#   bash benchmarks/quality/run.sh start NAME [run.py args]      # carried data -> $STAGE, join the GGUF, copy the
#                                      # code, start the harness detached, follow it for up to WAIT_S seconds
#   bash benchmarks/quality/run.sh wait NAME          # follow it again; when done, results and logs -> $OUT
set -uo pipefail
OUT=${OUT:-/tmp/quality_out}; mkdir -p "$OUT"
STAGE=${STAGE:-/root/stage}; mkdir -p "$STAGE"
SITE=${SITE:-/tmp/site} DEVICE=${DEVICE:-cuda}  # overridable for a dry run on a CPU machine
GGUF_NAME=qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
export DISABLE_VERSION_CHECK=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

follow() {  # NAME: print the harness's stage lines until it ends or WAIT_S seconds pass; copy what exists to $OUT
  local name=$1 log="$STAGE/$1.log"
  for _ in $(seq 1 "${WAIT_S:-530}"); do
    grep -q "^harness-exit" "$log" 2>/dev/null && break; sleep 1
  done
  grep -E "^\[|^error|^target|^harness|^weighted|^untrained|^fine_tuned|^tfidf|^seed|wrote|Error" "$log" | tail -60
  grep -q "^harness-exit" "$log" || echo "still running (bash benchmarks/quality/run.sh wait $name)"
  cp "$STAGE/results/$name".* "$STAGE/results/${name}_eval_f1.png" "$OUT/" 2>/dev/null
  cp "$log" "$OUT/harness.log" 2>/dev/null
  cp "$STAGE/$name.prev.log" "$OUT/harness.prev.log" 2>/dev/null
  (cd "$STAGE/work/$name" 2>/dev/null && tar czf "$OUT/logs.tgz" logs timings.json 2>/dev/null)
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null
}

cmd=${1:-}; shift || true
case $cmd in
  install)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      .whl/*.whl || exit 1
    # gguf has no __version__: its version comes from the installed metadata
    PYTHONPATH=$SITE python3 -c "import transformers, llamafactory, importlib.metadata as m; print('transformers', \
      transformers.__version__, 'llamafactory', llamafactory.__version__, 'gguf', m.version('gguf'))" ;;
  keep)
    python3 benchmarks/gpu/chunks.py keep "$@" --dest "$STAGE" ;;
  unpack)
    # one tar of .whl, .gpu_data/quality and .real_models/GGUF, chunked (chunks.py split --size_mb 53: with the
    # working tree, about 10.5 MiB now, a piece must stay under a call's 64 MiB), its pieces kept call by call:
    #   bash benchmarks/quality/run.sh unpack MANIFEST [NAME]   # join, check, untar, install the kit in $SITE,
    #                                                           # data -> $STAGE/quality, NAME's precomputed anchors
    manifest=${1:?usage: run.sh unpack MANIFEST [NAME]}; name=${2:-}
    python3 benchmarks/gpu/chunks.py join --manifest "$manifest" --dest "$STAGE" || exit 1
    rm -rf "$STAGE/payload" && mkdir -p "$STAGE/payload" && tar xf "$STAGE/payload.tar" -C "$STAGE/payload" || exit 1
    rm -f "$STAGE/payload.tar"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$STAGE"/payload/.whl/*.whl || exit 1
    rm -rf "$STAGE/quality" && cp -r "$STAGE/payload/.gpu_data/quality" "$STAGE/quality" || exit 1
    ln -sfn "$STAGE/payload/.real_models/$GGUF_NAME" "$STAGE/$GGUF_NAME"
    if [ -n "$name" ] && [ -d "$STAGE/quality/anchor" ]; then
      mkdir -p "$STAGE/work/$name/anchor" && cp "$STAGE"/quality/anchor/seed*.json "$STAGE/work/$name/anchor/"
    fi
    ls "$STAGE/quality" && PYTHONPATH=$SITE python3 -c "import transformers, llamafactory; print('transformers', \
      transformers.__version__, 'llamafactory', llamafactory.__version__)" ;;
  start)
    name=${1:-}; [ -n "$name" ] || { echo "usage: run.sh start NAME [run.py args]"; exit 2; }; shift
    [ -d "$SITE/llamafactory" ] || { echo "no kit in $SITE: run.sh install first (carry .whl)"; exit 1; }
    if [ -s "$STAGE/$name.log" ] && ! grep -q "^harness-exit" "$STAGE/$name.log"; then
      echo "$name is already running"; follow "$name"; exit 0
    fi
    if [ -f .gpu_data/quality/train.json ]; then
      rm -rf "$STAGE/quality" && cp -r .gpu_data/quality "$STAGE/quality" || exit 1
    fi
    # IMAGES: the split's images already on the machine (e.g. the vLLM payload's data/images, the same mire_dev
    # files), so that only the split's json travels
    if [ -n "${IMAGES:-}" ] && [ ! -d "$STAGE/quality/images" ]; then ln -sfn "$IMAGES" "$STAGE/quality/images"; fi
    [ -f "$STAGE/quality/test.json" ] || { echo "no data in $STAGE/quality: carry .gpu_data/quality"; exit 1; }
    if [ ! -f "$STAGE/$GGUF_NAME" ]; then
      python3 benchmarks/gpu/chunks.py join --manifest "${MANIFEST:-.stage/manifest.json}" --dest "$STAGE" \
        --names "$GGUF_NAME" || exit 1
    fi
    # the harness runs on a copy of the code: a later call re-syncs the working tree under a running process
    rm -rf "$STAGE/repo" && mkdir -p "$STAGE/repo" && cp -r mire_factory tools configs benchmarks pyproject.toml \
      "$STAGE/repo/" || exit 1
    # a second start (e.g. after --prepare_only) keeps the first one's log beside the new one
    [ -s "$STAGE/$name.log" ] && cat "$STAGE/$name.log" >> "$STAGE/$name.prev.log"
    : > "$STAGE/$name.log"
    # the subshell's own output goes to /dev/null too: it holds the caller's stdout until the harness ends, so a
    # caller piping this (h200_chain.sh: run.sh start ... | tail) would otherwise wait for the whole harness
    # run.py's arguments quoted for the inner shell: a --variant NAME="ARGS" stays one argument
    args=""; if [ $# -gt 0 ]; then args=$(printf ' %q' "$@"); fi
    ( cd "$STAGE/repo" && PYTHONPATH=$SITE:$STAGE/repo setsid nohup bash -c "python3 benchmarks/quality/run.py \
        --train_file $STAGE/quality/train.json --test_file $STAGE/quality/test.json \
        --image_dir $STAGE/quality/images --out $name --workdir $STAGE/work/$name --model_dir $STAGE/model \
        --gguf $STAGE/$GGUF_NAME --results_dir $STAGE/results --device $DEVICE$args; echo harness-exit \$?" \
        >> "$STAGE/$name.log" 2>&1 < /dev/null & ) > /dev/null 2>&1 < /dev/null
    echo "started $name (log $STAGE/$name.log)"; follow "$name" ;;
  wait)
    [ -n "${1:-}" ] || { echo "usage: run.sh wait NAME"; exit 2; }; follow "$1" ;;
  *) echo "usage: run.sh install | keep PIECES | unpack MANIFEST [NAME] | start NAME [args] | wait NAME"; exit 2 ;;
esac
