#!/usr/bin/env bash
# One H200 lease for issues 16, 19 and 22, from the repo root, after vllm_session.sh install (SITE=/tmp/site2) and
# run.sh install (/tmp/site) with the GGUF pieces kept: a detached chain, so that no decision waits between calls
# (the machine goes back 30 s after a call ends, and everything staged with it):
#   1. the quality harness's preparation (run.sh start $HARNESS $HARNESS_ARGS --prepare_only: model, data, untrained
#      pass, tokenization; mostly CPU) and, beside it, the vLLM stages that count and check but do not time:
#      check, then serve. Their engines get a fixed KV cache (kv_cache_memory_bytes), which skips vLLM's start-up
#      memory profiling: that profiling fails when another process frees GPU memory meanwhile;
#   2. once both are done, the harness's trainings alone (run.sh start again, without --prepare_only);
#   3. then F1 of its fine-tuned label_s0 model through vLLM, against its own hf figure.
#   SKIP_SPEED=1 is implied: the speed stages (exclusive) stand from the first lease; SKIP_VLLM=1 leaves out step 1's
#   vLLM stages (e.g. when their figures stand), SKIP_HARNESS=1 the harness and f1.
#   bash benchmarks/gpu/h200_chain.sh start     # returns at once; the chain outlives the call, not the machine
#   bash benchmarks/gpu/h200_chain.sh wait      # follow for up to WAIT_S s; bring back what exists
set -uo pipefail
STAGE_DIR=${STAGE_DIR:-/root/stage}
RES=$STAGE_DIR/results
OUT=${OUT:-/tmp/chain_out}; mkdir -p "$OUT" "$RES"
HARNESS=${HARNESS:-h200_05b}
LOG=$RES/chain.txt
SHARED_ENGINE='{"gpu_memory_utilization": 0.3, "kv_cache_memory_bytes": 8000000000}'

chain() {
  local work=$STAGE_DIR/work/$HARNESS
  eval "local -a hargs=($HARNESS_ARGS)"  # HARNESS_ARGS is shell-quoted: --variant 'augment=--augment 1' stays one
  harness_done() { grep -q "^harness-exit" "$STAGE_DIR/$HARNESS.log" 2>/dev/null; }
  if [ -z "${SKIP_HARNESS:-}" ]; then
    echo "chain: preparing the harness ($(date +%T))"
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True WAIT_S=1 STAGE=$STAGE_DIR IMAGES=$STAGE_DIR/data/images SITE=${HARNESS_SITE:-/tmp/site} \
      bash benchmarks/quality/run.sh start "$HARNESS" "${hargs[@]}" --prepare_only | tail -3
  fi
  [ -n "${SKIP_VLLM:-}" ] || for s in check serve; do
    echo "=== $s ($(date +%T))"
    ENGINE_EXTRA=$SHARED_ENGINE SERVE_EXTRA="--gpu-memory-utilization 0.3 --kv-cache-memory-bytes 8000000000" \
      OUT=$RES/$s bash benchmarks/gpu/vllm_session.sh "$s"
  done
  [ -n "${SKIP_HARNESS:-}" ] && { echo "chain-done ($(date +%T))"; return; }
  for _ in $(seq 1 1800); do harness_done && break; sleep 1; done
  grep -E "^prepared|^error" "$STAGE_DIR/$HARNESS.log"
  echo "chain: training ($(date +%T))"
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True WAIT_S=1 STAGE=$STAGE_DIR IMAGES=$STAGE_DIR/data/images SITE=${HARNESS_SITE:-/tmp/site} \
    bash benchmarks/quality/run.sh start "$HARNESS" "${hargs[@]}" | tail -3
  for _ in $(seq 1 3600); do harness_done && break; sleep 1; done
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
    export -f chain; export STAGE_DIR RES HARNESS SHARED_ENGINE HARNESS_ARGS="${HARNESS_ARGS:-}" \
      SKIP_VLLM="${SKIP_VLLM:-}" SKIP_HARNESS="${SKIP_HARNESS:-}" HARNESS_SITE="${HARNESS_SITE:-}"
    # the subshell's output to /dev/null as well: otherwise it holds the caller's stdout open for the whole chain
    (cd "$STAGE_DIR/code" && setsid nohup bash -c chain > "$LOG" 2>&1 < /dev/null &) > /dev/null 2>&1 < /dev/null
    echo "chain started (log $LOG)" ;;
  wait)
    for _ in $(seq 1 "${WAIT_S:-540}"); do grep -q "^chain-done" "$LOG" 2>/dev/null && break; sleep 1; done
    cat "$LOG" | tail -60
    WAIT_S=1 bash benchmarks/quality/run.sh wait "$HARNESS" > "$OUT/harness_follow.txt" 2>&1
    tail -25 "$OUT/harness_follow.txt"
    cp "$STAGE_DIR/$HARNESS.log" "$OUT/harness.log" 2>/dev/null
    cp "$STAGE_DIR/results/$HARNESS".* "$STAGE_DIR/results/${HARNESS}_eval_f1.png" "$OUT/" 2>/dev/null
    (cd "$STAGE_DIR/work/$HARNESS" 2>/dev/null && tar czf "$OUT/harness_logs.tgz" logs timings.json \
      */infer/metrics.json */ft/trainer_state.json untrained/metrics.json 2>/dev/null)
    tar czf "$OUT/chain_results.tar.gz" -C "$RES" chain.txt check serve f1 2>/dev/null
    nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
    ls -la "$OUT" ;;
  *) echo "usage: h200_chain.sh start | wait"; exit 2 ;;
esac
