#!/usr/bin/env bash
# One H200 lease for issues 16 and 22, from the repo root, after vllm_session.sh install: a detached chain that
#   1. waits for the exclusive speed stages (bg:speed_hf,speed_vllm: nothing else may share the GPU while they time);
#   2. starts the quality harness (benchmarks/quality/run.sh start $HARNESS $HARNESS_ARGS);
#   3. beside it, the vLLM stages that count and check but do not time: check, then serve (its req/s are taken while
#      the harness trains: BENCHMARKS says so). Their engines get a fixed KV cache (kv_cache_memory_bytes), which
#      skips vLLM's start-up memory profiling: that profiling fails when another process frees GPU memory meanwhile,
#      and the harness's runs start and end all the time;
#   4. once the harness is done: F1 of its fine-tuned label_s0 model through vLLM, against its own hf figure.
#   bash benchmarks/gpu/h200_chain.sh start     # returns at once; the chain outlives the call, not the machine
#   bash benchmarks/gpu/h200_chain.sh wait      # follow for up to WAIT_S s; bring back what exists
set -uo pipefail
STAGE_DIR=${STAGE_DIR:-/root/stage}
RES=$STAGE_DIR/results
OUT=${OUT:-/tmp/chain_out}; mkdir -p "$OUT" "$RES"
HARNESS=${HARNESS:-h200_05b}
LOG=$RES/chain.txt
SHARED_ENGINE='{"gpu_memory_utilization": 0.15, "kv_cache_memory_bytes": 8000000000}'

chain() {
  echo "chain: waiting for the speed stages ($(date +%T))"
  # SKIP_SPEED=1: no speed stages this lease (their figures stand)
  [ -n "${SKIP_SPEED:-}" ] || for _ in $(seq 1 1200); do
    grep -q "^bg-done" "$RES/bg_speed_hf,speed_vllm.txt" 2>/dev/null && break; sleep 1; done
  echo "chain: speed stages done ($(date +%T)); starting the harness"
  WAIT_S=1 IMAGES=$STAGE_DIR/data/images \
    bash benchmarks/quality/run.sh start "$HARNESS" ${HARNESS_ARGS:-} | tail -3
  sleep 60  # the harness's first GPU work (model build, untrained inference) before a vLLM engine starts beside it
  for s in check serve; do
    echo "=== $s ($(date +%T))"
    ENGINE_EXTRA=$SHARED_ENGINE SERVE_EXTRA="--gpu-memory-utilization 0.15 --kv-cache-memory-bytes 8000000000" \
      OUT=$RES/$s bash benchmarks/gpu/vllm_session.sh "$s"
  done
  echo "chain: waiting for the harness ($(date +%T))"
  for _ in $(seq 1 1800); do grep -q "^harness-exit" "$STAGE_DIR/$HARNESS.log" 2>/dev/null && break; sleep 1; done
  local work=$STAGE_DIR/work/$HARNESS
  echo "=== f1 ($(date +%T))"
  F1_BACKENDS=vllm F1_HF_METRICS=$work/label_s0/infer/metrics.json \
    F1_ARGS="--max_new_tokens 100 --cutoff_len 10240 --image_max_pixels 589824" OUT=$RES/f1 \
    bash benchmarks/gpu/vllm_session.sh f1 "$work/label_s0/ft" "$work/data" mire_test "$STAGE_DIR/quality/test.json"
  echo "chain-done ($(date +%T))"
}

case ${1:-} in
  start)
    # the chain runs on a copy of the code: later calls re-sync the working tree under it
    rm -rf "$STAGE_DIR/code" && mkdir -p "$STAGE_DIR/code" && cp -r mire_factory tools configs benchmarks tests \
      pyproject.toml "$STAGE_DIR/code/" || exit 1
    export -f chain; export STAGE_DIR RES HARNESS SHARED_ENGINE HARNESS_ARGS="${HARNESS_ARGS:-}" SKIP_SPEED="${SKIP_SPEED:-}"
    (cd "$STAGE_DIR/code" && setsid nohup bash -c chain > "$LOG" 2>&1 < /dev/null &)
    echo "chain started (log $LOG)" ;;
  wait)
    for _ in $(seq 1 "${WAIT_S:-540}"); do grep -q "^chain-done" "$LOG" 2>/dev/null && break; sleep 1; done
    cat "$LOG" | tail -60
    WAIT_S=1 bash benchmarks/quality/run.sh wait "$HARNESS" > "$OUT/harness_follow.txt" 2>&1
    tail -25 "$OUT/harness_follow.txt"
    cp "$STAGE_DIR/$HARNESS.log" "$OUT/harness.log" 2>/dev/null
    cp "$STAGE_DIR/results/$HARNESS".* "$STAGE_DIR/results/${HARNESS}_eval_f1.png" "$OUT/" 2>/dev/null
    (cd "$STAGE_DIR/work/$HARNESS" 2>/dev/null && tar czf "$OUT/harness_logs.tgz" logs timings.json \
      */infer/metrics.json untrained/metrics.json 2>/dev/null)
    tar czf "$OUT/chain_results.tar.gz" -C "$RES" chain.txt check serve f1 2>/dev/null
    nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
    ls -la "$OUT" ;;
  *) echo "usage: h200_chain.sh start | wait"; exit 2 ;;
esac
