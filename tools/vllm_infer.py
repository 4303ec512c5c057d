"""Batch inference on a LLaMA-Factory-format MIRE dataset with training-identical prompts (vLLM or transformers).

    python -m tools.vllm_infer --config configs/predict.yaml --dataset_dir data/mire
    python -m tools.vllm_infer --config configs/qwen2_vl_full_sft.yaml --dataset mire_test
    python -m tools.vllm_infer --model_name_or_path M --dataset mire_test --dataset_dir O [--backend vllm|hf]
        [--constrained] [--num_shards N --shard_index I] [--merge_shards] [--overwrite]

--config supplies what must equal training (cutoff_len, image pixel limits, template, the prompt variant of the
training data) from a predict or training YAML, or from a trained model's directory (its training_args.yaml, read
without --config too); flags override it. The answer format (label or CoT JSON) is the dataset's prompt variant's.
Predictions resume by id; SAVE_NAME.meta.json records the model and settings, and a resume from others is refused.
"""

from __future__ import annotations

from mire_factory.hparams import parse_args
from mire_factory.infer.args import InferArgs, config_values
from mire_factory.infer.pipeline import run
from mire_factory.io import run_cli


def main(argv: list[str] | None = None) -> int:
    run(parse_args(InferArgs, argv, description=__doc__, config_values=config_values))
    return 0


if __name__ == "__main__":
    run_cli(main)
