"""Out-of-fold label check: train K models on K stratified splits, predict each held-out fold, list the suspects.

python -m tools.kfold --input_file train.json --image_dir images --output_dir kfold --model_name_or_path M
    [--recipe configs/qwen2_vl_full_sft.yaml] [--folds 5] [--seeds 42 43] [--min_agreement 1.0]
    [--launcher llamafactory-cli|mire_factory.train] [--train_overrides deepspeed=null max_steps=100 ...]
    [--infer_flags "--backend vllm"] [--convert_flags "--augment 1 --dialogue_image_max_pixels 175616"]
    [--corrections_file corrections.jsonl]

Each (fold, seed): tools.convert of the other folds (no validation split) and of the held-out fold as a test file,
training through LLaMA-Factory with the recipe and overrides, tools.vllm_infer on the held-out fold.
--convert_flags converts the folds as the real training data is (tools.convert's flags, checked by its parser before
any fold runs; those kfold sets itself refused): the held-out fold gets the per-task caps, --info_file and
--info_max_tokens but never --augment, --augment_mask_ratio or --seed, and its inference the caps. --corrections_file
relabels the input before the split (the folds train on, and suspects are checked against, the corrected labels).
A rerun skips the runs whose predictions are complete. Writes OUT/suspects.jsonl (a corrections file, status
suspected: records whose out-of-fold label is the same non-gold label in --min_agreement of the seeds),
OUT/review.html (its review page) and OUT/oof_predictions.jsonl; review, then `tools.convert --corrections_file`.
"""

from __future__ import annotations

import json

from mire_factory.hparams import parse_args
from mire_factory.io import run_cli
from mire_factory.kfold import KFoldArgs, run_kfold


def main(argv: list[str] | None = None) -> int:
    summary = run_kfold(parse_args(KFoldArgs, argv, description=__doc__))
    print(json.dumps(summary, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    run_cli(main)
