#!/usr/bin/env bash
# On the lent GPU machine, from the repo root: install the carried wheels, then run the named benchmarks.
#   bash benchmarks/gpu/run.sh NAME [NAME ...]
#   bash benchmarks/gpu/run.sh stage_wheels   (with .whl_big carried: keeps its wheels for the lease's later calls)
# NAMEs: smoke, ours_2b, ours_2b_zero2, baseline_2b, baseline_2b_fit, ours_7b, baseline_7b, baseline_7b_fit,
#        ours_2b_nods, ours_2b_recipe, ours_2b_recipe_long, ours_2b_nogc, ours_2b_nogc_long, ours_2b_liger,
#        ours_7b_2gpu, ours_7b_offload, ours_7b_pure_bf16,
#        launcher_7b_2gpu, infer_2b, infer_2b_compiled, infer_2b_phases,
#        issue 20 (one H200, no DeepSpeed, low-bit AdamW states; needs torchao in .whl): ours_7b_1gpu,
#        ours_7b_1gpu_long, ours_7b_1gpu_b2, ours_7b_1gpu_sr, ours_7b_1gpu_sr_long, ours_7b_1gpu_ao4,
#        ours_7b_1gpu_liger, ours_7b_1gpu_pack(_nogc)(_long), ours_7b_1gpu_pack_liger,
#        loss_2b (2B, 100 steps: fp32 Adam states against the low-bit ones), loss_pack_2b (dense vs varlen),
#        lora_7b, freeze_7b, lora_2b, freeze_2b (configs/qwen2_vl_{lora,freeze}_sft.yaml as shipped),
#        ours_7b_1gpu_nogc(_long), ours_7b_1gpu_compile, ours_2b_pack(_nogc), ours_2b_pack20k_nogc, ours_2b_b4, ours_2b_nogc_b2(_long), ours_2b_ao8,
#        ours_2b_compile; any training NAME+flash (mire_right_pad_causal=true, labelled NAME_flash), NAME+varlen
#        (mire_packed_varlen=true, labelled NAME_varlen), NAME+logits (mire_label_logits_only=true, NAME_logits),
#        NAME+gcK (mire_checkpoint_layers=K: checkpointing in the first K language-model layers only, NAME_gcK),
#        NAME+liger (enable_liger_kernel=true: Liger's RMSNorm, SwiGLU and mrope kernels, NAME_liger),
#        NAME+gaN (gradient_accumulation_steps=N, NAME_gaN),
#        NAME+bnb (optim=adamw_bnb_8bit, NAME_bnb), NAME+notrim (mire_trim_padding=false, NAME_notrim),
#        NAME+master (mire_master_weights=true: bf16 weights in the model, fp32 masters in the optimizer, NAME_master;
#        one optimizer step a micro-batch, so the packed runs), loss_master_2b (2B, 100 steps of 8-record batches:
#        fp32 Adam states, 8-bit states over fp32 weights, and the same with master weights),
#        NAME+ligerl (mire_liger_layers=true, NAME_ligerl), NAME+fp8 (mire_fp8_adam_states=true, NAME_fp8),
#        combined as NAME+flash+logits (NAME_flash_logits).
# Results (JSON + logs) go to $OUT (the device tool fetches it) or /tmp/bench_out.
# Needs .whl (benchmarks/gpu/fetch_wheels.sh) and .gpu_data (benchmarks/gpu/prepare_data.py) carried along.
set -uo pipefail
OUT=${OUT:-/tmp/bench_out}; mkdir -p "$OUT"
# STAGED_WHEELS: wheels too big to travel with .whl (bitsandbytes, 43 MB: fetch_wheels.sh puts it in .whl_big/), copied
# there by an earlier call of the same lease (`run.sh stage_wheels` with .whl_big carried)
STAGED_WHEELS=${STAGED_WHEELS:-/root/stage/whl}
if [ "${1:-}" = stage_wheels ]; then
  mkdir -p "$STAGED_WHEELS" && cp .whl_big/*.whl "$STAGED_WHEELS"/ && ls -la "$STAGED_WHEELS"; exit $?
fi
# bg: and wait: only start and collect a queue, whose own run.sh installs; a second install into /tmp/site meanwhile
# collides with the queue's (thirteenth lease: pip's FileNotFoundError 'REQUESTED', and the queue died at once)
if [[ "${1:-}" != bg:* && "${1:-}" != wait:* ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    $(ls "$STAGED_WHEELS"/*.whl 2>/dev/null) || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD DISABLE_VERSION_CHECK=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
RECIPE=configs/qwen2_vl_full_sft.yaml
RECIPE_2B=configs/qwen2_vl_2b_full_sft.yaml
RECIPE_7B1=configs/qwen2_vl_7b_1gpu_full_sft.yaml
# bf16 weights, gradients and 8-bit Adam states updated with stochastic rounding (torchao; transformers passes
# bf16_stochastic_round from optim_args to AdamW8bit/AdamW4bit only)
SR=(pure_bf16=true bf16=false optim_args=bf16_stochastic_round=True)
STEPS=${STEPS:-25}
COMMON=(dataset_dir=.gpu_data/mire eval_dataset=null "eval_strategy='no'" "save_strategy='no'" max_steps=$STEPS
        logging_steps=5 report_to=none output_dir=/tmp/run overwrite_output_dir=true preprocessing_num_workers=8
        dataloader_num_workers=4 plot_loss=false)
# The official baseline: ZeRO-3 offloading params and optimizer (LLaMA-Factory's ds_z3_offload_config.json), batch 4 x
# accumulation 2, fp16, cutoff 1024 (image tokens truncated).
BASELINE=(deepspeed=configs/ds_zero3_offload.json fp16=true bf16=false per_device_train_batch_size=4
          gradient_accumulation_steps=2 cutoff_len=1024)

# random-weight Qwen2-VL checkpoints of the real architectures, built on the GPU; on disk, not in /tmp, which can be
# a RAM-backed tmpfs: a 16 GB 7B checkpoint there is 16 GB less host RAM for the CPU-offloaded optimizer
MODELS=${MODELS:-$PWD/.gpu_models}
# MODEL_LAYERS=N: the training runs' models get N language-model layers, every width kept (m7b_l10 for 7b at 10): a
# 7B-wide model that fits an 80 GB GPU, to time there what does not depend on depth (e.g. +emb32's cost)
mdir() { echo "$MODELS/m$1${MODEL_LAYERS:+_l$MODEL_LAYERS}"; }
model() {
  [ -f "$(mdir $1)/config.json" ] || python3 -m tools.make_tiny_model --out "$(mdir $1)" --preset $1 --device cuda \
    ${MODEL_LAYERS:+--num_hidden_layers $MODEL_LAYERS}
}
train() {  # label nproc preset extra-overrides...
  local label=$1$SUFFIX nproc=$2 preset=$3; shift 3
  model "$preset" || return 1
  echo "=== $label"; nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
  torchrun --nproc_per_node "$nproc" --master_port $((29500 + RANDOM % 1000)) benchmarks/gpu/train_bench.py \
    --profile --skip_save --label "$label" --out "$OUT/$label.json" $RECIPE model_name_or_path="$(mdir $preset)" "${COMMON[@]}" "$@" "${EXTRA[@]}" \
    > "$OUT/$label.log" 2>&1
  local rc=$?; grep -E "^BENCH|Error|error:|Killed|OOM|out of memory" "$OUT/$label.log" | tail -5; echo "rc=$rc"
  # run_sft saves the model at the end (a 7B fp32 save is 30 GB): two of them filled the lent machine's disk once
  rm -rf /tmp/run
  free -g | head -2
}
for name in "$@"; do
  # NAME+flash: NAME with the language model's attention mask-free on right-padded batches (mire_right_pad_causal,
  # mire_factory/attention.py: SDPA's flash kernel instead of the memory-efficient one), labelled NAME_flash;
  # NAME+varlen: that and packed records attended one by one (mire_packed_varlen), labelled NAME_varlen
  # NAME+logits: the output layer at label positions only (mire_label_logits_only, label_logits.py), NAME_logits;
  # NAME+gcK: gradient checkpointing in the first K language-model layers only, the others keeping their activations
  # (mire_checkpoint_layers=K, mire_factory/checkpoint_layers.py), NAME_gcK; NAME must keep checkpointing on
  # NAME+liger: LLaMA-Factory's enable_liger_kernel (Liger's RMSNorm, SwiGLU and mrope kernels), NAME_liger; its fused
  # loss replaces the label logits, so with +logits it is refused (since the fourteenth session): use +ligerl
  # NAME+gaN: gradient_accumulation_steps=N after NAME's own (a packed run: N packs, ~8N records, an optimizer step,
  # so the 8-bit AdamW step, about a sixth of a packed 7B step, is paid once per N packs), NAME_gaN; at 7B with fp32
  # weights and K=4 it ran out of memory (thirteenth lease): the fp32 gradients stay allocated through the forwards
  # NAME+bnb: optim=adamw_bnb_8bit (bitsandbytes' 8-bit AdamW over the fp32 weights, in place of the one-GPU recipe's
  # torchao AdamW8bit: the same speed at 7B in the twelfth lease), NAME_bnb; needs bitsandbytes staged (STAGED_WHEELS)
  # NAME+notrim: packs keep their trailing padding (mire_trim_padding=false; on by default with varlen), NAME_notrim
  # NAME+master: the model computes from bf16 copies of the weights, the optimizer updates the fp32 masters
  # (mire_master_weights=true, master_weights.py: no fp32-to-bf16 weight casts at every use, a bf16 residual
  # stream), NAME_master; refused with gradient accumulation, so for the packed runs (accumulation 1)
  # NAME+ligerl: Liger's RMSNorm, SwiGLU, LayerNorm and mrope kernels without its loss (mire_liger_layers=true,
  # liger_layers.py: goes with +logits, unlike +liger), NAME_ligerl
  # NAME+fp8: torchao's AdamW with fp8 states in place of its 8-bit ones (mire_fp8_adam_states=true,
  # fp8_adam_states.py; needs the recipe's optim=adamw_torch_8bit), NAME_fp8
  # NAME+emb32: fp32 Adam states for the embeddings under the low-bit AdamW (mire_fp32_embedding_states=true,
  # embedding_states.py: no m/eps updates where an 8-bit second moment rounds to zero), NAME_emb32
  # NAME+4bit: optim=adamw_torch_4bit (torchao's AdamW4bit, whose second-moment map has no zero), NAME_4bit
  # suffixes combine (NAME+flash+logits: NAME_flash_logits)
  EXTRA=(); SUFFIX=""
  while [[ $name != bg:* && $name != wait:* && $name == *+* ]]; do
    case ${name##*+} in
      flash) EXTRA=(mire_right_pad_causal=true "${EXTRA[@]}"); SUFFIX=_flash$SUFFIX ;;
      varlen) EXTRA=(mire_packed_varlen=true "${EXTRA[@]}"); SUFFIX=_varlen$SUFFIX ;;
      logits) EXTRA=(mire_label_logits_only=true "${EXTRA[@]}"); SUFFIX=_logits$SUFFIX ;;
      gc[0-9]*) EXTRA=(mire_checkpoint_layers=${name##*+gc} "${EXTRA[@]}"); SUFFIX=_${name##*+}$SUFFIX ;;
      liger) EXTRA=(enable_liger_kernel=true "${EXTRA[@]}"); SUFFIX=_liger$SUFFIX ;;
      ga[0-9]*) EXTRA=(gradient_accumulation_steps=${name##*+ga} "${EXTRA[@]}"); SUFFIX=_${name##*+}$SUFFIX ;;
      bnb) EXTRA=(optim=adamw_bnb_8bit "${EXTRA[@]}"); SUFFIX=_bnb$SUFFIX ;;
      notrim) EXTRA=(mire_trim_padding=false "${EXTRA[@]}"); SUFFIX=_notrim$SUFFIX ;;
      master) EXTRA=(mire_master_weights=true "${EXTRA[@]}"); SUFFIX=_master$SUFFIX ;;
      ligerl) EXTRA=(mire_liger_layers=true "${EXTRA[@]}"); SUFFIX=_ligerl$SUFFIX ;;
      fp8) EXTRA=(mire_fp8_adam_states=true "${EXTRA[@]}"); SUFFIX=_fp8$SUFFIX ;;
      emb32) EXTRA=(mire_fp32_embedding_states=true "${EXTRA[@]}"); SUFFIX=_emb32$SUFFIX ;;
      4bit) EXTRA=(optim=adamw_torch_4bit "${EXTRA[@]}"); SUFFIX=_4bit$SUFFIX ;;
      *) break ;;
    esac
    name=${name%+*}
  done
  case $name in
    smoke) python3 -c "import llamafactory, deepspeed, transformers, torch; print(llamafactory.__version__, deepspeed.__version__, transformers.__version__, torch.__version__, torch.cuda.get_device_name(0))"
           nvidia-smi --query-gpu=name,memory.total --format=csv; free -g | head -2; nproc; df -h /tmp "$PWD" ;;
    ours_2b) train ours_2b 1 2b ;;
    ours_2b_zero2) train ours_2b_zero2 1 2b deepspeed=configs/ds_zero2.json ;;
    # 2B fits one GPU with fp32 master weights and Adam states (~25 GB): no DeepSpeed at all
    ours_2b_nods) train ours_2b_nods 1 2b deepspeed=null ;;
    # the 2B recipe as shipped (no DeepSpeed, micro-batch 2 x 4); *_long: 64 copies of an 11-image dialogue (8881
    # tokens) for its peak memory. Its figures were taken as ours_2b_gc_b2(_long): the same settings, then overrides.
    ours_2b_recipe) RECIPE=$RECIPE_2B train ours_2b_recipe 1 2b ;;
    ours_2b_recipe_long) RECIPE=$RECIPE_2B train ours_2b_recipe_long 1 2b dataset=mire_long max_steps=8 ;;
    # issue 20's 2B target (>= 6x baseline_2b_fit's samples/s): the 2B recipe with packing (samples/s counts packed
    # sequences: divide tokens/s by the unpacked 1174 tokens a record; train_bench counts all input ids there),
    # micro-batches of 4, no checkpointing at 2 x 4, 8-bit Adam states
    # one packed sequence (~8 records of the sample) a micro-batch and a step: no padding, tokens counted exactly,
    # about the recipes' 8 records an optimizer step
    # *_nogc: no recompute (a packed 2B sequence's activations are ~20 GB)
    # *_pack20k*: packs of 20,480 tokens (~17 records) a step, half the steps' fixed costs a record
    ours_2b_pack|ours_2b_pack_nogc|ours_2b_pack20k_nogc) RECIPE=$RECIPE_2B train $name 1 2b neat_packing=true \
      per_device_train_batch_size=1 gradient_accumulation_steps=1 \
      $([[ $name == *nogc ]] && echo disable_gradient_checkpointing=true) \
      $([[ $name == *pack20k* ]] && echo cutoff_len=20480) ;;
    ours_2b_b4) RECIPE=$RECIPE_2B train ours_2b_b4 1 2b per_device_train_batch_size=4 gradient_accumulation_steps=2 ;;
    ours_2b_nogc_b2*) RECIPE=$RECIPE_2B train $name 1 2b disable_gradient_checkpointing=true \
      $([[ $name == *long ]] && echo dataset=mire_long max_steps=8) ;;
    ours_2b_ao8) RECIPE=$RECIPE_2B train ours_2b_ao8 1 2b optim=adamw_torch_8bit ;;
    # torch.compile of the model (the Trainer's torch_compile): fewer, fused kernels per micro-batch; shapes vary with
    # every batch, so its first steps recompile (trained 4 steps on the CPU with the tiny model)
    ours_2b_compile) RECIPE=$RECIPE_2B train ours_2b_compile 1 2b torch_compile=true ;;
    # no gradient checkpointing: faster on the sample, out of memory on the 11-image dialogues (*_long)
    ours_2b_nogc*) RECIPE=$RECIPE_2B train $name 1 2b disable_gradient_checkpointing=true per_device_train_batch_size=1 \
      gradient_accumulation_steps=8 $([[ $name == *long ]] && echo dataset=mire_long max_steps=8) ;;
    # Liger's Triton kernels (fused linear + cross entropy in chunks: no 152k-vocab logits), no checkpointing: slower
    ours_2b_liger) train ours_2b_liger 1 2b deepspeed=null disable_gradient_checkpointing=true enable_liger_kernel=true ;;
    baseline_2b) train baseline_2b 1 2b "${BASELINE[@]}" ;;
    # LLaMA-Factory 0.9.5 stops with a shape error when cutoff_len cuts through image tokens (mrope positions), so the
    # baseline's own cutoff 1024 cannot run on MIRE dialogues; *_fit keeps its other settings with a cutoff that fits.
    baseline_2b_fit) train baseline_2b_fit 1 2b "${BASELINE[@]}" cutoff_len=4096 ;;
    baseline_7b_fit) train baseline_7b_fit 1 7b "${BASELINE[@]}" cutoff_len=4096 ;;
    # the recipe as shipped (ZeRO-3, no offload): 121 GiB on one GPU, so an H200; 80 GB GPUs need two
    ours_7b) train ours_7b 1 7b ;;
    ours_7b_2gpu) train ours_7b_2gpu 2 7b ;;
    # CPU offload of params and optimizer (the baseline's config) needs more than a 128 GB host has at 7B
    ours_7b_offload) train ours_7b_offload 1 7b deepspeed=configs/ds_zero3_offload.json ;;
    baseline_7b) train baseline_7b 1 7b "${BASELINE[@]}" ;;
    # one 80 GB GPU: bf16 params, grads and Adam states (~62 GB), no DeepSpeed (LLaMA-Factory refuses it under ZeRO-3)
    ours_7b_pure_bf16) train ours_7b_pure_bf16 1 7b deepspeed=null pure_bf16=true bf16=false ;;
    # issue 20: 7B on one H200 without DeepSpeed. The first optimizer step compiles torchao's per-parameter update
    # (torch.compile, one graph per parameter shape): left out of the timing with the 3 warm-up steps.
    # fp32 master weights (LLaMA-Factory upcasts the trained parameters) + torchao AdamW8bit states: the recipe
    ours_7b_1gpu) RECIPE=$RECIPE_7B1 train ours_7b_1gpu 1 7b ;;
    ours_7b_1gpu_long) RECIPE=$RECIPE_7B1 train ours_7b_1gpu_long 1 7b dataset=mire_long max_steps=8 ;;
    # micro-batches of 2 x 4 (the 2B recipe's split): fewer launches, if the memory allows
    ours_7b_1gpu_b2*) RECIPE=$RECIPE_7B1 train $name 1 7b per_device_train_batch_size=2 gradient_accumulation_steps=4 \
      $([[ $name == *long ]] && echo dataset=mire_long max_steps=8) ;;
    # bf16 weights with stochastic rounding, 8-bit states: ~45 GB of weights, gradients and states instead of ~75
    ours_7b_1gpu_sr*) RECIPE=$RECIPE_7B1 train $name 1 7b "${SR[@]}" \
      $([[ $name == *long ]] && echo dataset=mire_long max_steps=8) ;;
    # no gradient checkpointing: no recompute (a quarter of a step's work with it); 48 GB were free at batch 1 with it
    ours_7b_1gpu_nogc*) RECIPE=$RECIPE_7B1 train $name 1 7b disable_gradient_checkpointing=true \
      $([[ $name == *long ]] && echo dataset=mire_long max_steps=8) ;;
    ours_7b_1gpu_compile) RECIPE=$RECIPE_7B1 train ours_7b_1gpu_compile 1 7b torch_compile=true ;;
    # 4-bit states (torchao AdamW4bit) over fp32 master weights
    ours_7b_1gpu_ao4) RECIPE=$RECIPE_7B1 train ours_7b_1gpu_ao4 1 7b optim=adamw_torch_4bit ;;
    # Liger's fused linear cross entropy, RMSNorm, SwiGLU, mrope at 7B (slowest at 2B, where the vocabulary dominates)
    ours_7b_1gpu_liger) RECIPE=$RECIPE_7B1 train ours_7b_1gpu_liger 1 7b enable_liger_kernel=true ;;
    # LLaMA-Factory's neat_packing: records packed up to cutoff_len, each with its own mrope positions and a
    # block-diagonal attention mask (dense 4D under sdpa: no flash-attn in the kit), packs up to cutoff_len (10240).
    # Its samples/s counts packed sequences (several records each): training_table.py gives records/s
    # accumulation 1: a packed sequence holds ~8 records of the sample, the recipe's 8 records an optimizer step
    # *_nogc: no recompute (~45 GB of activations a 10,240-token sequence by arithmetic, if it fits); *_long: the
    # 11-image dialogues packed, one 8,881-token record a sequence, for the packed recipe's peak memory
    ours_7b_1gpu_pack|ours_7b_1gpu_pack_nogc|ours_7b_1gpu_pack_long|ours_7b_1gpu_pack_nogc_long)
      RECIPE=$RECIPE_7B1 train $name 1 7b neat_packing=true gradient_accumulation_steps=1 \
        $([[ $name == *nogc* ]] && echo disable_gradient_checkpointing=true) \
        $([[ $name == *long ]] && echo dataset=mire_long max_steps=8) ;;
    # packed with Liger's fused linear cross entropy: no 10240 x 152k fp32 logits a sequence
    ours_7b_1gpu_pack_liger) RECIPE=$RECIPE_7B1 train ours_7b_1gpu_pack_liger 1 7b neat_packing=true \
      gradient_accumulation_steps=1 enable_liger_kernel=true ;;
    # 2B, 100 optimizer steps on the same data and seed: fp32 Adam states (the 2B recipe as shipped) against
    # torchao's 8-bit states over fp32 weights and over bf16 weights with stochastic rounding, or against
    # LOSS_VARIANTS (e.g. '--variant bnb8=optim=adamw_bnb_8bit') (loss_compare.json,
    # loss_compare.png, one log and trainer_state.json per run); about 2-3 min a run at the 2B recipe's 7 samples/s
    loss_2b)
      model 2b && python3 benchmarks/gpu/loss_compare.py --out "$OUT/loss_2b" --steps ${LOSS_STEPS:-100} \
        --variant "fp32_states=" ${LOSS_VARIANTS:---variant "ao8=optim=adamw_torch_8bit" \
        --variant "ao8_sr_bf16=optim=adamw_torch_8bit ${SR[*]}"} \
        $RECIPE_2B model_name_or_path="$(mdir 2b)" dataset_dir=.gpu_data/mire eval_dataset=null \
        preprocessing_num_workers=8 dataloader_num_workers=4 seed=42 data_seed=42 > "$OUT/loss_2b.log" 2>&1
      echo "rc=$?"; tail -6 "$OUT/loss_2b.log" ;;
    # mire_master_weights' loss curve at 2B: one optimizer step per micro-batch of 8 records (it refuses gradient
    # accumulation; the recipe's 2 x 4 is the same 8 records a step), against fp32 states and against the 7B
    # one-GPU recipe's setting (8-bit states over fp32 weights under autocast)
    # LOSS_MASTER_VARIANTS: other variants, a shell word list (e.g. '--variant "fp32_master=optim=adamw_torch
    # mire_master_weights=true"': fp32 states with master weights, whose difference from fp32_states is the bf16 compute's)
    loss_master_2b)
      eval "MASTER_VARIANTS=(${LOSS_MASTER_VARIANTS:---variant fp32_states=optim=adamw_torch --variant ao8= \
        --variant ao8_master=mire_master_weights=true})"
      model 2b && python3 benchmarks/gpu/loss_compare.py --out "$OUT/loss_master_2b" --steps ${LOSS_STEPS:-100} \
        "${MASTER_VARIANTS[@]}" \
        $RECIPE_2B model_name_or_path="$(mdir 2b)" dataset_dir=.gpu_data/mire eval_dataset=null \
        per_device_train_batch_size=8 gradient_accumulation_steps=1 optim=adamw_torch_8bit \
        preprocessing_num_workers=8 dataloader_num_workers=4 seed=42 data_seed=42 > "$OUT/loss_master_2b.log" 2>&1
      echo "rc=$?"; tail -6 "$OUT/loss_master_2b.log" ;;
    # packed 2B training, the dense block-diagonal mask against per-record varlen attention (mire_packed_varlen):
    # the same data and seed, 30 steps; the losses must agree within bf16 noise
    loss_pack_2b)
      model 2b && python3 benchmarks/gpu/loss_compare.py --out "$OUT/loss_pack_2b" --steps ${LOSS_STEPS:-30} \
        --variant "dense=" --variant "varlen=mire_packed_varlen=true" \
        $RECIPE_2B model_name_or_path="$(mdir 2b)" dataset_dir=.gpu_data/mire eval_dataset=null neat_packing=true \
        per_device_train_batch_size=1 gradient_accumulation_steps=1 preprocessing_num_workers=8 \
        dataloader_num_workers=4 seed=42 data_seed=42 > "$OUT/loss_pack_2b.log" 2>&1
      echo "rc=$?"; tail -6 "$OUT/loss_pack_2b.log" ;;
    # the LoRA and freeze recipes as shipped (freeze: ZeRO-2, 25 of 28 layers); MFU still counts 6 x all LLM params
    lora_7b|lora_2b) RECIPE=configs/qwen2_vl_lora_sft.yaml train $name 1 ${name#lora_} ;;
    freeze_7b|freeze_2b) RECIPE=configs/qwen2_vl_freeze_sft.yaml train $name 1 ${name#freeze_} ;;
    launcher_7b_2gpu)
      model 7b && FORCE_TORCHRUN=1 NPROC_PER_NODE=2 timeout 540 python3 -m mire_factory.train $RECIPE model_name_or_path="$(mdir 7b)" \
        deepspeed=configs/ds_zero3.json mire_f1_max_samples=16 \
        dataset_dir=.gpu_data/mire eval_dataset=mire_val "eval_strategy='steps'" eval_steps=5 "save_strategy='no'" \
        max_steps=10 logging_steps=5 report_to=none output_dir=/tmp/run_launcher overwrite_output_dir=true \
        mire_f1_max_new_tokens=16 > "$OUT/launcher_7b_2gpu.log" 2>&1; echo "rc=$?"
      grep -o '"eval_f1[a-z_]*": [0-9.]*' /tmp/run_launcher/trainer_state.json | sort | uniq | head; 
      cp /tmp/run_launcher/trainer_state.json "$OUT/launcher_trainer_state.json" 2>/dev/null ;;
    infer_2b) model 2b && python3 -m benchmarks.bench_infer --model "$(mdir 2b)" --n 256 --batch_size 32 64 \
                --images_on device cpu --new_tokens 16 \
                --out "$OUT/bench_infer.json" > "$OUT/bench_infer.log" 2>&1; echo "rc=$?"; tail -5 "$OUT/bench_infer.log" ;;
    # tools.vllm_infer --compile (varlen attention and compiled blocks in the vision tower, compiled decode steps;
    # timed after a pass that compiles) against the default kernels
    infer_2b_compiled) model 2b && python3 -m benchmarks.bench_infer --model "$(mdir 2b)" --n 256 --batch_size 32 \
                --kernels compiled eager --images_on device --phases --new_tokens 16 \
                --out "$OUT/bench_infer_compiled.json" > "$OUT/bench_infer_compiled.log" 2>&1; echo "rc=$?"
                tail -5 "$OUT/bench_infer_compiled.log" ;;
    # where a batch's time goes (no per-sample loop): image processor on the GPU vs on the CPU, phase by phase
    infer_2b_phases) model 2b && python3 -m benchmarks.bench_infer --model "$(mdir 2b)" --n 256 --batch_size 32 64 \
                --images_on device cpu --phases --skip_loop --new_tokens 16 --out "$OUT/bench_infer_phases.json" \
                > "$OUT/bench_infer_phases.log" 2>&1; echo "rc=$?"; tail -30 "$OUT/bench_infer_phases.log" ;;
    bg:*)  # start benchmarks detached (they outlive this call), one after the other: bg:A,B,C; collect with wait:A,B,C
      names=${name#bg:}
      OUT=/tmp/bench_out setsid nohup bash -c "bash benchmarks/gpu/run.sh ${names//,/ }; echo bg-done" \
        > "/tmp/bg_$(echo "$names" | md5sum | cut -c1-12).txt" 2>&1 < /dev/null &
      echo "started $names in the background" ;;
    wait:*)  # wait (up to WAIT_S seconds) for detached benchmarks, then copy their results to $OUT
      names=${name#wait:}; log=/tmp/bg_$(echo "$names" | md5sum | cut -c1-12).txt  # the bg: call's log
      for _ in $(seq 1 "${WAIT_S:-540}"); do grep -q "^bg-done" "$log" 2>/dev/null && break; sleep 1; done
      cat "$log"; for n in ${names//,/ }; do
        n=${n//+/_}  # NAME+flash+logits ran as NAME_flash_logits
        cp /tmp/bench_out/"$n"* "$OUT"/ 2>/dev/null
        case $n in infer*) cp /tmp/bench_out/bench_infer* "$OUT"/ 2>/dev/null ;;
                   loss*) cp -r /tmp/bench_out/"$n" "$OUT"/ 2>/dev/null ;; esac
        tail -c 1500 /tmp/bench_out/"$n".log 2>/dev/null; done ;;
    *) echo "unknown benchmark $name"; exit 2 ;;
  esac
done
