#!/usr/bin/env bash
# tools.kfold on the lent GPU beside a running harness: does it find planted label errors? (issue 19, item 5)
# From the repo root, after run.sh install and run.sh start NAME (whose model stage builds $STAGE/model), with
# .gpu_data/quality/noise/ carried (label_noise.py inject: train_noisy.json, plants.json):
#   bash benchmarks/quality/kfold_noise.sh start NAME   # detached: waits for NAME's model, then kfold seed 0 and
#                                                       # seed 1 side by side, each scored; then both seeds, scored
#   bash benchmarks/quality/kfold_noise.sh wait         # follow for up to WAIT_S s; results -> $OUT/kfold.tgz
set -uo pipefail
OUT=${OUT:-/tmp/quality_out}; mkdir -p "$OUT"
STAGE=${STAGE:-/root/stage}; SITE=${SITE:-/tmp/site}
K=$STAGE/kfold_noise; LOG=$STAGE/kfold_noise.log
FOLDS=${FOLDS:-4}
# the harness's recipe (benchmarks/quality/run.py train_overrides) for 107 training dialogues a fold: 6 epochs;
# EXTRA_OVERRIDES for a CPU dry run (use_cpu=true ...)
OVERRIDES="learning_rate=2e-05 num_train_epochs=${EPOCHS:-6} per_device_train_batch_size=2 gradient_accumulation_steps=4
  disable_gradient_checkpointing=true mire_label_logits_only=true save_strategy='no' report_to=none logging_steps=5
  preprocessing_num_workers=8 dataloader_num_workers=4 overwrite_output_dir=true ${EXTRA_OVERRIDES:-}"

kfold() {  # OUTPUT_DIR SEED...: tools.kfold on the planted file, then its suspects scored (score_seeds_S_S.json)
  local dir=$1; shift
  # shellcheck disable=SC2086
  PYTHONPATH=$SITE:$STAGE/kcode python3 -m tools.kfold --input_file "$STAGE/quality/noise/train_noisy.json" \
    --image_dir "$STAGE/quality/images" --output_dir "$dir" --model_name_or_path "$STAGE/model" \
    --recipe configs/qwen2_vl_2b_full_sft.yaml --launcher mire_factory.train --folds "$FOLDS" --seeds "$@" \
    --infer_flags "--backend hf --batch_size 32 --cutoff_len 10240" --train_overrides $OVERRIDES
  echo "kfold-exit $? (seeds $*)"
  local tag; tag=$(IFS=_; echo "$*")
  PYTHONPATH=$SITE:$STAGE/kcode python3 benchmarks/quality/label_noise.py score \
    --plants "$STAGE/quality/noise/plants.json" --suspects "$dir/suspects.jsonl" --out "$K/score_seeds_$tag.json"
  cp "$dir/suspects.jsonl" "$K/suspects_seeds_$tag.jsonl" 2>/dev/null
  cp "$dir/summary.json" "$K/summary_seeds_$tag.json" 2>/dev/null
}

chain() {
  for _ in $(seq 1 900); do grep -q "^\[model\] [0-9]\|^\[model\] done earlier" "$STAGE/$NAME.log" 2>/dev/null && break; sleep 2; done
  cd "$STAGE/kcode" || exit 1
  mkdir -p "$K"
  # the two seeds side by side (one tools.kfold per folder), then seed 1's runs moved into seed 0's folder, where
  # tools.kfold --seeds 0 1 finds every run predicted and only collects: suspects agreed on by both seeds
  echo "=== kfold seed 0 and seed 1 side by side ($(date +%T))"
  kfold "$K" 0 > "$STAGE/kfold_noise_s0.log" 2>&1 &
  kfold "${K}_s1" 1 > "$STAGE/kfold_noise_s1.log" 2>&1
  wait
  grep -h "^kfold-exit\|^{\|^error" "$STAGE"/kfold_noise_s[01].log
  for f in "${K}_s1"/fold_*; do mv "$f/seed_1" "$K/$(basename "$f")/"; done
  echo "=== kfold seeds 0 1: collect ($(date +%T))"
  kfold "$K" 0 1
  echo "kfold-chain-done ($(date +%T))"
}

case ${1:-} in
  start)
    NAME=${2:?usage: kfold_noise.sh start NAME}
    rm -rf "$STAGE/kcode" && mkdir -p "$STAGE/kcode" && cp -r mire_factory tools configs benchmarks pyproject.toml \
      "$STAGE/kcode/" || exit 1
    [ -f "$STAGE/quality/noise/plants.json" ] || { echo "no $STAGE/quality/noise: carry .gpu_data/quality"; exit 1; }
    export -f chain kfold; export STAGE SITE K NAME FOLDS OVERRIDES DISABLE_VERSION_CHECK=1 TOKENIZERS_PARALLELISM=false \
      PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    (setsid nohup bash -c chain > "$LOG" 2>&1 < /dev/null &) > /dev/null 2>&1 < /dev/null
    echo "kfold chain started (log $LOG)" ;;
  wait)
    for _ in $(seq 1 "${WAIT_S:-60}"); do grep -q "^kfold-chain-done" "$LOG" 2>/dev/null && break; sleep 1; done
    grep -vE "it/s\]|s/it\]|\|.*\|" "$LOG" | tail -20
    (cd "$STAGE" && tar czf "$OUT/kfold.tgz" kfold_noise.log kfold_noise_s0.log kfold_noise_s1.log \
      $(cd "$STAGE" && ls -d kfold_noise/*.json kfold_noise/*.jsonl kfold_noise/review.html \
        kfold_noise/fold_*/seed_*/train.log kfold_noise/fold_*/seed_*/model/trainer_state.json 2>/dev/null))
    ls -la "$OUT/kfold.tgz" ;;
  *) echo "usage: kfold_noise.sh start NAME | wait"; exit 2 ;;
esac
