"""Merge teacher reasons into a converted train file: CoT answers {"理由": ..., "所属类别": ...} within a token budget.

python -m tools.convert --input_file train.json --image_dir images --output_dir data --prompt_variant cot
python -m tools.merge_cot --dataset_file data/mire_train.json --reasons_file reasons.jsonl [--reasons_file ...]
    --output_file data/mire_train_cot.json [--max_output_tokens 100]

The train file must be converted with a CoT prompt variant (cot: label key last; cot_label_first): its user turns,
definitions and answer format included, are kept as written, and answers take the variant's format. Convert the test
file with the same variant. Answers are counted with the real Qwen2 tokenizer, <|im_end|> included. Registers the
output (by its file stem, e.g. mire_train_cot) in the dataset_info.json beside it, with the same variant.
"""

from __future__ import annotations

import argparse

from mire_factory.cot import merge_cot
from mire_factory.io import run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_file", required=True,
                        help="a train file written by tools.convert --prompt_variant cot (or cot_label_first)")
    parser.add_argument("--reasons_file", required=True, action="append",
                        help="reasons JSONL of tools.distill; repeat to merge several (earlier files win)")
    parser.add_argument("--output_file", required=True)
    parser.add_argument("--max_output_tokens", type=int, default=100,
                        help="budget of the whole assistant turn, <|im_end|> included (competition: 100)")
    parser.add_argument("--dataset_name", default=None, help="registered name (default: the output file stem)")
    parser.add_argument("--keep_mismatched", action="store_true",
                        help="keep records whose teacher label differs from gold (the answer carries the gold label)")
    parser.add_argument("--keep_unexplained", action="store_true",
                        help="keep records without a usable reason, as label-only answers")
    args = parser.parse_args(argv)
    if args.max_output_tokens < 1:
        parser.error("--max_output_tokens must be positive")
    report = merge_cot(
        args.dataset_file, args.reasons_file, args.output_file, max_output_tokens=args.max_output_tokens,
        keep_mismatched=args.keep_mismatched,
        keep_unexplained=args.keep_unexplained, dataset_name=args.dataset_name,
    )
    print(report.text())
    return 0


if __name__ == "__main__":
    run_cli(main)
