"""Ask a teacher model (OpenAI-compatible server: vLLM, `llamafactory-cli api`, a hosted API) for reasons.

python -m tools.distill --input_file train.json --image_dir images --base_url http://127.0.0.1:8000/v1 \\
    --model Qwen2-VL-72B-Instruct --mode 3 --output_file reasons.jsonl [--concurrency 16] [--max_retries 5]

Modes: 1 free reasoning over the label list (no gold label); 2 gold label + all definitions, explain why;
3 as 2 in at most --max_chars characters. One JSONL line per (record, mode, model), appended and fsync'd one by one:
rerun the same command to resume (records done, refused or failed before are skipped; --retry_failed asks the
failed ones again and replaces their lines). The API key comes from $OPENAI_API_KEY (or --api_key_env NAME).

Exit codes: 0 every request answered (ok or refused); 2 bad input, an --output_file that is not a reasons file, or
another run writing it; 3 finished, but failed lines remain (this run's or skipped ones): rerun with --retry_failed.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field

from mire_factory.distill import DistillConfig, build_request, check_modes, run_distill
from mire_factory.hparams import parse_args
from mire_factory.io import run_cli
from mire_factory.records import load_records
from mire_factory.teacher import TeacherRunFields, api_key_from_env, print_dry_run, report_run


@dataclass(kw_only=True)
class DistillArguments(TeacherRunFields, DistillConfig):
    """The flags (or the keys of a --config YAML): the run's (and TeacherRunFields), then what is asked and how
    (DistillConfig)."""

    input_file: str = field(metadata={"help": "MIRE train (or test, for mode 1) json"})
    image_dir: str = field(metadata={"help": "folder of the images"})
    output_file: str | None = field(default=None, metadata={"help": "reasons JSONL (appended to; not needed with "
                                                                    "--dry_run)"})
    limit: int | None = field(default=None, metadata={"help": "only the first N records"})

    def __post_init__(self):
        problems = self.check()
        if not self.model:
            problems.append("--model is required")
        if not self.dry_run and not (self.base_url and self.output_file):
            problems.append("--base_url and --output_file are required (unless --dry_run)")
        if self.max_chars < 1:
            problems.append("--max_chars must be at least 1")
        if self.limit is not None and self.limit < 1:
            problems.append("--limit must be at least 1")
        if problems:
            raise ValueError("\n".join(problems))
        self.modes = list(dict.fromkeys(self.modes))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(DistillArguments, argv, __doc__)
    records = load_records(args.input_file, args.image_dir)
    if args.limit is not None:
        records = records[: args.limit]
    check_modes(records, args.modes, args.input_file)
    if args.dry_run:
        return print_dry_run(build_request(records[0], args.image_dir, args.modes[0], args),
                             f"{len(records) * len(args.modes)} requests ({len(records)} records x modes {args.modes})")
    api_key = api_key_from_env(args.api_key_env)
    try:
        summary = asyncio.run(run_distill(records, args.image_dir, args, args.output_file, api_key=api_key,
                                          progress=args.progress))
    except KeyboardInterrupt:
        print(f"interrupted: finished lines are in {args.output_file}; rerun the same command to resume",
              file=sys.stderr)
        return 130
    return report_run(summary, args.output_file, tool="distill")


if __name__ == "__main__":
    run_cli(main)
