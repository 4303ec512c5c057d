"""Merge teacher reasons into a converted train file, every assistant turn within a token budget. Two layouts:

--layout inline (default): CoT answers {"理由": ..., "所属类别": ...}.
python -m tools.convert --input_file train.json --image_dir images --output_dir data --prompt_variant cot
python -m tools.merge_cot --dataset_file data/mire_train.json --reasons_file reasons.jsonl [--reasons_file ...]
    --output_file data/mire_train_cot.json [--max_output_tokens 100]

The train file must be converted with a CoT prompt variant (cot: label key last; cot_label_first): its user turns,
definitions and answer format included, are kept as written, and answers take the variant's format.

--layout second_turn: the bare label, then the reason as a second exchange (user: 原因为何？, assistant: the reason).
python -m tools.convert --input_file train.json --image_dir images --output_dir data    # plain (or screenshot_text)
python -m tools.merge_cot --layout second_turn --dataset_file data/mire_train.json --reasons_file reasons.jsonl
    --output_file data/mire_train_reason.json

The train file must be converted with a label prompt variant (plain, screenshot_text); inference asks only the first
exchange, so the model answers a bare label. Train without mask_history: with it LLaMA-Factory trains the last turn
only, the reason, and never the label.

Either way convert the test file with the same variant. Turns are counted with the real Qwen2 tokenizer, <|im_end|>
included. Registers the output (by its file stem) in the dataset_info.json beside it, with the same variant (and the
layout, for second_turn).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mire_factory.cot import COT_LAYOUTS, INLINE, merge_cot
from mire_factory.hparams import config_field, parse_args
from mire_factory.io import run_cli
from mire_factory.prompts import REASON_QUESTION
from mire_factory.rules import MAX_NEW_TOKENS, check_new_tokens


@dataclass(kw_only=True)
class MergeCotArguments:
    dataset_file: str = field(metadata={
        "help": "a train file written by tools.convert: --prompt_variant cot (or cot_label_first) for --layout "
                "inline; plain (or screenshot_text) for second_turn"})
    reasons_file: list[str] = field(metadata={
        "help": "reasons JSONL of tools.distill; repeat to merge several (earlier files win)", "action": "extend"})
    output_file: str = field(metadata={"help": "the CoT train file to write (registered beside it)"})
    layout: str = field(default=INLINE, metadata={
        "help": "inline: the reason inside a CoT answer, written at inference too; second_turn: the answer is the bare "
                f"label and a second exchange (user: {REASON_QUESTION}) carries the reason, trained on but never asked at "
                "inference", "choices": list(COT_LAYOUTS)})
    max_output_tokens: int = field(default=MAX_NEW_TOKENS, metadata={
        "help": "budget of each assistant turn, <|im_end|> included (second_turn: the label, and the reason "
                f"shortened to it too; competition: at most {MAX_NEW_TOKENS})"})
    dataset_name: str | None = field(default=None, metadata={"help": "registered name (default: the output file "
                                                                     "stem)"})
    keep_mismatched: bool = field(default=False, metadata={
        "help": "keep records whose teacher label differs from gold (the answer carries the gold label)"})
    keep_unexplained: bool = field(default=False, metadata={
        "help": "keep records without a usable reason, as label-only answers"})
    no_competition_limits: bool = field(default=False, metadata={
        "help": f"allow --max_output_tokens above {MAX_NEW_TOKENS} (mire_factory/rules.py)"})
    config: str | None = config_field()

    def __post_init__(self):
        if self.max_output_tokens < 1:
            raise ValueError("--max_output_tokens must be positive")
        if not self.no_competition_limits:
            check_new_tokens(self.max_output_tokens, "--max_output_tokens")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(MergeCotArguments, argv, __doc__)
    report = merge_cot(
        args.dataset_file, args.reasons_file, args.output_file, max_output_tokens=args.max_output_tokens,
        keep_mismatched=args.keep_mismatched,
        keep_unexplained=args.keep_unexplained, dataset_name=args.dataset_name, layout=args.layout,
    )
    print(report.text())
    return 0


if __name__ == "__main__":
    run_cli(main)
