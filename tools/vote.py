"""Majority vote across models' prediction files, each file's answers read first (mire_factory/answers.py):
python -m tools.vote --prediction_file P1 --prediction_file P2 --prediction_file P3 --test_file T --save_path OUT.jsonl
    [--weights 1,1,1] [--tie_break first|weights|model:K] [--unanimous_out U.json] [--fill] [--by_position]

Each file is one model's call per sample: at most 3 of them, as the competition allows (mire_factory/rules.py;
--no_competition_limits lifts it). An invalid answer casts no vote; a record no file answers validly keeps the first
file's answer (invalid) unless --fill, which gives every answer the nearest label first (and missing ids the task's
default)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mire_factory.hparams import config_field, parse_args
from mire_factory.io import MireInputError, OutputSet, read_json, run_cli
from mire_factory.predictions import load_answers
from mire_factory.records import KINDS, load_records
from mire_factory.rules import MAX_MODEL_CALLS, check_model_calls
from mire_factory.vote import TieBreak, format_agreement, parse_weights, vote


@dataclass(kw_only=True)
class VoteArguments:
    prediction_file: list[str] = field(metadata={
        "help": f"repeat once per model (2 to {MAX_MODEL_CALLS}: each is one model call per sample)",
        "action": "extend"})
    test_file: str = field(metadata={"help": "MIRE json: the ids and tasks to vote on"})
    save_path: str = field(metadata={"help": "prediction JSONL with id and predict per line"})
    weights: str | None = field(default=None, metadata={
        "help": "comma-separated positive weight per prediction file (default: all 1)"})
    tie_break: str = field(default="first", metadata={
        "help": "first (earliest file), weights (heaviest file) or model:K (trust file K, 1-based)"})
    unanimous_out: str | None = field(default=None, metadata={
        "help": "write the records all files agree on, `output` set to that label"})
    fill: bool = field(default=False, metadata={
        "help": "give every answer a label first (the nearest; missing ids the task's default)"})
    by_position: bool = field(default=False, metadata={
        "help": "pair prediction files without ids with the test records by position"})
    kind: str = field(default="auto", metadata={"help": "the test file's kind (labels are not needed)",
                                                "choices": list(KINDS)})
    no_competition_limits: bool = field(default=False, metadata={
        "help": f"allow more than {MAX_MODEL_CALLS} prediction files (mire_factory/rules.py)"})
    config: str | None = config_field()

    def __post_init__(self):
        if len(self.prediction_file) < 2:
            raise ValueError("--prediction_file: give at least two files to vote")
        if not self.no_competition_limits:
            check_model_calls(len(self.prediction_file), "--prediction_file")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(VoteArguments, argv, __doc__)
    files = args.prediction_file
    try:
        weights = parse_weights(args.weights, len(files))
        tie = TieBreak.parse(args.tie_break, len(files))
    except ValueError as exc:
        raise MireInputError(str(exc)) from None
    records = load_records(args.test_file, None, kind=args.kind)
    label_lists, first_texts = [], []
    for file in files:
        answers, report, _ = load_answers(records, file, fill=args.fill, by_position=args.by_position)
        print(f"{file}: {report.lines()[0]}")
        label_lists.append([a.label for a in answers])
        first_texts = first_texts or [a.text for a in answers]
    result = vote(label_lists, weights, tie)

    rows = [
        {"id": r.id, "predict": label if label is not None else text, "task": r.task, "votes": votes,
         "unanimous": unanimous}
        for r, label, text, votes, unanimous in zip(records, result.labels, first_texts, result.votes,
                                                   result.unanimous, strict=True)
    ]
    n_none = sum(label is None for label in result.labels)
    if n_none:
        print(f"{n_none} records have no valid answer in any file: kept the first file's answer (invalid)")
    with OutputSet() as outs:  # the vote and its pseudo-labels are replaced together, or neither
        outs.write_jsonl(args.save_path, rows)
        if args.unanimous_out:
            raw = {example["id"]: example for example in read_json(args.test_file)}
            chosen = [
                {**raw[r.id], "output": label}
                for r, label, unanimous in zip(records, result.labels, result.unanimous, strict=True)
                if unanimous and label is not None  # no valid answer anywhere is no pseudo-label
            ]
            outs.write_json(args.unanimous_out, chosen)
    print(format_agreement(result.agreement, files))
    n_unanimous, n_tied = sum(result.unanimous), sum(result.tied)
    print(f"{n_unanimous}/{len(records)} records unanimous, {n_tied} ties broken by '{args.tie_break}'")
    print(f"wrote {args.save_path}")
    if args.unanimous_out:
        print(f"wrote {args.unanimous_out}: {len(chosen)} pseudo-labelled records")
    return 0


if __name__ == "__main__":
    run_cli(main)
