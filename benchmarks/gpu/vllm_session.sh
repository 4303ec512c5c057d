#!/usr/bin/env bash
# The vLLM session on the lent GPU (issue 22), one stage per device call, from the repo root:
#   bash benchmarks/gpu/vllm_session.sh STAGE [ARGS]
# Stages (benchmarks/gpu/VLLM.md has the call plan, with what each carries and its minutes):
#   keep PIECE          copy one payload piece (.stage/vllm/payload.tar.xz.partNN) to $STAGE_DIR
#   install PIECE       keep the last piece, join (sha256), unpack, pip install --no-deps --target $SITE, convert
#                       the data, build the 2B random-weight model, import check          (~2-3 min)
#   check               token and pixel identity with training (bench_vllm --check --engine_ids), then
#                       tools.vllm_infer --backend vllm --constrained, label and CoT answers: validity counts (~5 min)
#                       CHECK_FORMATS="cot" (default "label cot") and CHECK_IDS=0 (default 1) leave parts out
#   speed_hf            benchmarks.bench_infer on the same records: hf eager, hf --compile, per-sample loop on
#                       $LOOP_N records (~5 min)
#   speed_vllm          benchmarks.bench_vllm --speed --phases (the tool's engine) and --offline_llm (the code
#                       before), then the four-way comparison with speed_hf's figures     (~3 min)
#   variants [NAME...]  more engine settings, one engine each (default: renderer16 gpu_processor batched32k eager)
#                                                                                        (~1 min each)
#   serve               vllm serve as the teacher: tools.distill modes 1-3 over the records, SIGKILLed once it has
#                       written KILL_AT=500 lines and rerun (resumed), then
#                       req/s at concurrency 16, 32, 64 (benchmarks/bench_distill.py)   (~4 min)
#                       SERVE_RESUME=0 leaves the kill-and-resume run out (req/s only)
#   f1 MODEL DATASET_DIR DATASET TEST_JSON
#                       F1 of a fine-tuned model through vLLM and through hf, tools.cal_acc (~3-5 min)
#   bg:A,B / wait:A,B   run stages detached, one after the other (past the 10-minute call limit; call wait:A,B
#                       at once: the machine goes back 30 s after a call) / wait, then bring back one summary JSON and
#                       a tar.gz of their results and logs
# Results: $OUT (what the device tool brings back; at most 8 files a call), and $STAGE_DIR/results (kept while the
# machine is warm).
set -uo pipefail
STAGE_DIR=${STAGE_DIR:-/root/stage}
SITE=${SITE:-/tmp/site}
OUT=${OUT:-/tmp/vllm_out}
MODEL=${MODEL:-$STAGE_DIR/models/m2b}
DATA=$STAGE_DIR/data
RES=$STAGE_DIR/results
LOOP_N=${LOOP_N:-64}
PORT=${PORT:-8011}
mkdir -p "$OUT" "$RES"
export PYTHONPATH=$SITE:$PWD DISABLE_VERSION_CHECK=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=${PY:-python3}

keep() { $PY benchmarks/gpu/chunks.py keep "$1" --dest "$STAGE_DIR" && ls "$STAGE_DIR" | tr '\n' ' ' && echo; }

timed() {  # label command...: runs it, logs to $OUT/label.log, prints rc and seconds
  local label=$1; shift
  local start=$SECONDS
  "$@" > "$OUT/$label.log" 2>&1
  local rc=$?
  echo "$label: rc=$rc in $((SECONDS - start)) s"
  return $rc
}

stage=${1:-}; shift || true
case $stage in
  keep) keep "$1" ;;

  install)
    start=$SECONDS
    keep "$1" || exit 1
    $PY benchmarks/gpu/chunks.py join --manifest "$(dirname "$1")/manifest.json" --dest "$STAGE_DIR" || exit 1
    rm -rf "$STAGE_DIR/payload" && mkdir -p "$STAGE_DIR/payload"
    $PY -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" \
      "$STAGE_DIR/payload.tar.xz" "$STAGE_DIR/payload" || exit 1
    echo "unpacked in $((SECONDS - start)) s: $(ls "$STAGE_DIR/payload/wheels" | wc -l) wheels"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$STAGE_DIR"/payload/wheels/*.whl || exit 1
    rm -rf "$DATA" && mv "$STAGE_DIR/payload/data" "$DATA" && rm -rf "$STAGE_DIR/payload"
    echo "installed in $((SECONDS - start)) s"
    $PY -m tools.convert --input_file "$DATA/test.json" --image_dir "$DATA/images" --output_dir "$DATA/mire" \
      | tail -3
    # the CoT answer format comes with the prompt variant the test set is converted with
    $PY -m tools.convert --input_file "$DATA/test.json" --image_dir "$DATA/images" --output_dir "$DATA/mire_cot" \
      --prompt_variant cot --quick | tail -1
    $PY -c "import vllm, transformers, tokenizers, torch, llamafactory, xgrammar, openai, fastapi
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.sampling_params import SamplingParams, StructuredOutputsParams
import vllm.entrypoints.openai.api_server, vllm.model_executor.models.qwen2_vl
print('vllm', vllm.__version__, 'transformers', transformers.__version__, 'tokenizers', tokenizers.__version__,
      'torch', torch.__version__, 'llamafactory', llamafactory.__version__, 'xgrammar', getattr(xgrammar, '__version__', '?'),
      'openai', openai.__version__, torch.cuda.get_device_name(0))" 2>&1 | tail -3
    $PY benchmarks/gpu/check_requires.py --site "$SITE" --json_out "$OUT/requires.json" | head -40
    [ -f "$MODEL/config.json" ] || timed make_model $PY -m tools.make_tiny_model --out "$MODEL" --preset 2b --device cuda
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; free -g | head -2
    echo "install stage: $((SECONDS - start)) s" ;;

  check)
    # ENGINE_EXTRA (JSON engine arguments, e.g. '{"gpu_memory_utilization": 0.3}'): room for another GPU job beside
    if [ "${CHECK_IDS:-1}" != 0 ]; then
      timed check $PY -m benchmarks.bench_vllm --model "$MODEL" --dataset_dir "$DATA/mire" --check --engine_ids \
        ${ENGINE_EXTRA:+--engine_args "$ENGINE_EXTRA"} --out "$OUT/check.json"
      tail -c 600 "$OUT/check.log"
    fi
    for fmt in ${CHECK_FORMATS:-label cot}; do
      dir=$DATA/mire; [ "$fmt" = cot ] && dir=$DATA/mire_cot  # the answer format is the dataset's prompt variant's
      timed "infer_$fmt" $PY -m tools.vllm_infer --model_name_or_path "$MODEL" --dataset mire_test \
        --dataset_dir "$dir" --backend vllm --constrained --overwrite --save_name "$RES/pred_$fmt.jsonl" \
        ${ENGINE_EXTRA:+--vllm_engine_args "$ENGINE_EXTRA"}
      grep -E "planned|records|Error|error" "$OUT/infer_$fmt.log" | grep -v Warning | tail -3
      $PY benchmarks/gpu/answer_validity.py --prediction_file "$RES/pred_$fmt.jsonl" --answer_format "$fmt" \
        --json_out "$OUT/valid_$fmt.json"
    done ;;

  speed_hf)
    timed speed_hf $PY -m benchmarks.bench_infer --model "$MODEL" --dataset_dir "$DATA/mire" --dataset mire_test \
      --batch_size 32 --kernels eager compiled --images_on device --new_tokens 16 --loop_n "$LOOP_N" \
      --image_max_pixels 589824 --plan_records 1000 --out "$OUT/speed_hf.json"
    cp "$OUT/speed_hf.json" "$RES/" 2>/dev/null; tail -c 1500 "$OUT/speed_hf.log" ;;

  speed_vllm)
    timed speed_vllm $PY -m benchmarks.bench_vllm --model "$MODEL" --dataset_dir "$DATA/mire" --speed --phases \
      --variants default --offline_llm --new_tokens 16 --out "$OUT/speed_vllm.json"
    cp "$OUT/speed_vllm.json" "$RES/" 2>/dev/null; tail -c 1500 "$OUT/speed_vllm.log"
    $PY benchmarks/gpu/vllm_compare.py --hf "$RES/speed_hf.json" --vllm "$RES/speed_vllm.json" \
      --json_out "$OUT/compare.json" ;;

  variants)
    names=${*:-renderer16 gpu_processor batched32k eager}
    timed variants $PY -m benchmarks.bench_vllm --model "$MODEL" --dataset_dir "$DATA/mire" --speed \
      --variants $names --new_tokens 16 --out "$OUT/variants.json"
    grep -E '^\{"variant' "$OUT/variants.log" | cut -c1-400 ;;

  serve)
    start=$SECONDS
    setsid $PY -m vllm.entrypoints.cli.main serve "$MODEL" --served-model-name teacher --port "$PORT" \
      --max-model-len 16384 --limit-mm-per-prompt '{"image": 11, "video": 0}' --renderer-num-workers 8 \
      --mm-processor-cache-gb 0 ${SERVE_EXTRA:-} > "$OUT/serve.log" 2>&1 < /dev/null &
    server=$!
    # up when /health answers; given up at once when the server has exited (a missing module, a bad argument)
    $PY - "$PORT" "$server" <<'EOF' || { tail -30 "$OUT/serve.log"; kill -- -"$server" 2>/dev/null; exit 1; }
import os, sys, time, urllib.request
port, pid = sys.argv[1], int(sys.argv[2])
for _ in range(300):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
        sys.exit(0)
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            print("vllm serve exited before it answered /health")
            sys.exit(1)
        time.sleep(1)
sys.exit(1)
EOF
    echo "server up in $((SECONDS - start)) s"
    # one request alone first: vLLM builds its processor per renderer thread on first use, through an unlocked
    # cache, so concurrent first requests each build one (mire_factory.infer.vllm_backend.FirstAlone)
    rm -f "$RES/warmup.jsonl"
    timed warmup $PY -m tools.distill --input_file "$DATA/labelled.json" --image_dir "$DATA/images" \
      --base_url "http://127.0.0.1:$PORT/v1" --model teacher --mode 1 --limit 1 \
      --output_file "$RES/warmup.jsonl" --max_tokens 8 --no_progress
    if [ "${SERVE_RESUME:-1}" != 0 ]; then  # the kill-and-resume run (SERVE_RESUME=0: req/s only)
      reasons="$RES/reasons.jsonl"; rm -f "$reasons"
      distill=($PY -m tools.distill --input_file "$DATA/labelled.json" --image_dir "$DATA/images"
               --base_url "http://127.0.0.1:$PORT/v1" --model teacher --mode 1 2 3 --output_file "$reasons"
               --concurrency 64 --max_tokens 32 --no_progress)
      "${distill[@]}" > "$OUT/distill_killed.log" 2>&1 &
      first=$!
      for _ in $(seq 1 1200); do  # SIGKILL once KILL_AT lines are written (or after 4 min)
        [ "$(wc -l 2>/dev/null < "$reasons" || echo 0)" -ge "${KILL_AT:-500}" ] && break
        kill -0 "$first" 2>/dev/null || break; sleep 0.2; done
      kill -9 "$first" 2>/dev/null; wait "$first" 2>/dev/null
      echo "first run killed (SIGKILL) with $(wc -l < "$reasons") lines"
      timed distill_resumed "${distill[@]}"; tail -3 "$OUT/distill_resumed.log"
      $PY - "$reasons" "$OUT/distill_resume.json" <<'EOF'
import collections, json, sys
rows = [json.loads(line) for line in open(sys.argv[1], encoding="utf-8") if line.strip()]
keys = collections.Counter((r["id"], r["mode"]) for r in rows)
out = {"lines": len(rows), "distinct_record_modes": len(keys), "duplicates": sum(n - 1 for n in keys.values()),
       "statuses": dict(collections.Counter(r["status"] for r in rows))}
print(json.dumps(out)); open(sys.argv[2], "w").write(json.dumps(out, indent=1) + "\n")
EOF
    fi
    timed distill_speed $PY benchmarks/bench_distill.py --base_url "http://127.0.0.1:$PORT/v1" --model teacher \
      --input_file "$DATA/labelled.json" --image_dir "$DATA/images" --mode 3 --requests 256 --max_tokens 64 \
      --concurrency 16 32 64 --json_out "$OUT/distill_speed.json"
    cat "$OUT/distill_speed.log" | tail -4
    kill -- -"$server" 2>/dev/null; wait "$server" 2>/dev/null
    echo "serve stage: $((SECONDS - start)) s" ;;

  f1)
    # F1_BACKENDS="vllm" with F1_HF_METRICS=M.json: hf's figure is tools.cal_acc's M.json of the same model, settings
    # and records (the quality harness's infer stage), not a second hf run
    model=$1 dataset_dir=$2 dataset=$3 test_json=$4
    for backend in ${F1_BACKENDS:-vllm hf}; do
      timed "f1_infer_$backend" $PY -m tools.vllm_infer --model_name_or_path "$model" --dataset "$dataset" \
        --dataset_dir "$dataset_dir" --backend "$backend" --overwrite --save_name "$RES/f1_$backend.jsonl" \
        ${F1_ARGS:-}
      $PY -m tools.cal_acc --test_file "$test_json" --prediction_file "$RES/f1_$backend.jsonl" \
        --json_file "$OUT/f1_$backend.json" | tail -4
    done
    [ -n "${F1_HF_METRICS:-}" ] && cp "$F1_HF_METRICS" "$OUT/f1_hf.json"
    $PY - "$OUT/f1_vllm.json" "$OUT/f1_hf.json" <<'EOF'
import json, sys
v, h = (json.load(open(p))["overall"]["f1"] for p in sys.argv[1:3])
print(json.dumps({"f1_vllm": v, "f1_hf": h, "difference": round(v - h, 4), "within_0.01": abs(v - h) <= 0.01}))
EOF
    ;;

  bg:*)  # bg:A,B,C runs the stages one after the other, detached: it outlives this call (not the machine)
    names=${stage#bg:}
    rm -f "$RES/bg_$names.txt"
    # on a copy of the code: later calls re-sync the working tree under a running stage
    code=$STAGE_DIR/code_${names//,/_}
    rm -rf "$code" && mkdir -p "$code" && cp -r mire_factory tools configs benchmarks tests pyproject.toml "$code/" || exit 1
    cd "$code" && export PYTHONPATH=$SITE:$PWD
    setsid nohup bash -c "for s in ${names//,/ }; do echo \"=== \$s\"; OUT=$RES/\$s bash benchmarks/gpu/vllm_session.sh \$s;
      done; echo bg-done" > "$RES/bg_$names.txt" 2>&1 < /dev/null &
    echo "started $names in the background" ;;

  wait:*)  # wait:A,B,C waits (up to WAIT_S s) for bg:A,B,C, then brings back summary.json and a tar.gz of it all
    names=${stage#wait:}
    for _ in $(seq 1 "${WAIT_S:-560}"); do grep -q "^bg-done" "$RES/bg_$names.txt" 2>/dev/null && break; sleep 1; done
    tail -c 6000 "$RES/bg_$names.txt"
    $PY - "$RES" "$OUT/summary_${names//,/_}.json" ${names//,/ } <<'EOF'
import json, pathlib, sys
res, out, names = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
summary = {name: {f.name: json.loads(f.read_text()) for f in sorted((res / name).glob("*.json"))} for name in names}
pathlib.Path(out).write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
EOF
    tar czf "$OUT/results_${names//,/_}.tar.gz" -C "$RES" ${names//,/ } "bg_$names.txt" 2>/dev/null
    ls -la "$OUT" ;;

  *) echo "unknown stage '$stage' (keep, install, check, speed_hf, speed_vllm, variants, serve, f1, bg:S, wait:S)"
     exit 2 ;;
esac
