"""Batch inference on a LLaMA-Factory-format MIRE dataset with training-identical prompts (vLLM or transformers).

    python -m tools.vllm_infer --model_name_or_path M --dataset mire_test --dataset_dir O [--backend vllm|hf]
        [--adapter_name_or_path A] [--cutoff_len 4096] [--max_new_tokens 100] [--constrained]
        [--answer_format label|cot] [--num_shards N --shard_index I] [--merge_shards]
        [--vllm_engine_args '{"max_num_seqs": 512}'] [--vllm_renderer_workers 8]
"""

from __future__ import annotations

import argparse

from mire_factory.infer.answer import ANSWER_FORMATS, LABEL_POSITIONS
from mire_factory.infer.pipeline import InferArgs, run
from mire_factory.io import run_cli


def parse_args(argv: list[str] | None = None) -> InferArgs:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path")
    p.add_argument("--adapter_name_or_path")
    p.add_argument("--dataset", required=True, help="name registered in DATASET_DIR/dataset_info.json")
    p.add_argument("--dataset_dir", required=True)
    p.add_argument("--template", default="qwen2_vl")
    p.add_argument("--backend", choices=["vllm", "hf"], help="default: vllm when importable, else hf")
    p.add_argument("--save_name", default="generated_predictions.jsonl")
    p.add_argument("--cutoff_len", type=int, default=4096, help="prompt token budget; longer dialogues are truncated")
    p.add_argument("--max_new_tokens", type=int, default=100)
    p.add_argument("--image_max_pixels", type=int, default=768 * 768)
    p.add_argument("--image_min_pixels", type=int, default=32 * 32)
    p.add_argument("--max_images_per_prompt", type=int, help="drop the earliest images beyond this many")
    p.add_argument("--batch_size", type=int, default=32, help="hf backend: prompts per generate call")
    p.add_argument("--compile", action="store_true",
                   help="hf backend on CUDA: varlen attention and torch.compile in the vision tower, a compiled decode "
                        "step (CUDA graphs); ~1.5 min of compiling first")
    p.add_argument("--vllm_engine_args", help="vllm backend: JSON object of extra vLLM engine arguments, e.g. "
                   "'{\"max_num_seqs\": 512, \"gpu_memory_utilization\": 0.5}'")
    p.add_argument("--vllm_renderer_workers", type=int, default=8,
                   help="vllm backend: threads running vLLM's multimodal processor")
    p.add_argument("--vllm_max_in_flight", type=int, default=512, help="vllm backend: requests handed over at once")
    p.add_argument("--image_workers", type=int, default=8,
                   help="vllm backend: threads decoding and resizing images before vLLM gets them")
    p.add_argument("--cot_reason_chars", type=int,
                   help="vllm backend, --constrained --answer_format cot: longest reason (default: the most that "
                        "always leaves room for the label within --max_new_tokens)")
    p.add_argument("--constrained", action="store_true", help="decode only valid labels of the record's task")
    p.add_argument("--answer_format", choices=ANSWER_FORMATS, default="label",
                   help="label: the bare label; cot: JSON with a free reason and a constrained label")
    p.add_argument("--label_position", choices=LABEL_POSITIONS, default="last", help="cot: label key last or first")
    p.add_argument("--num_shards", type=int, default=1)
    p.add_argument("--shard_index", type=int, default=0)
    p.add_argument("--merge_shards", action="store_true", help="merge the shard files of --save_name, then exit")
    p.add_argument("--tensor_parallel_size", type=int, default=1)
    p.add_argument("--no_competition_limits", action="store_true", help="allow --max_new_tokens above 100")
    return InferArgs(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    run_cli(main)
