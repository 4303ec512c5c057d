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

import argparse
import asyncio
import json
import sys

from mire_factory.distill import DistillConfig, build_request, check_modes, run_distill
from mire_factory.io import EXIT_FAILURES, run_cli
from mire_factory.records import load_records
from mire_factory.teacher import DEFAULT_MAX_PIXELS, api_key_from_env, elide_images, failure_summary, format_summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_file", required=True, help="MIRE train (or test, for mode 1) json")
    parser.add_argument("--image_dir", required=True)
    parser.add_argument("--base_url", help="e.g. http://127.0.0.1:8000/v1 (not needed with --dry_run)")
    parser.add_argument("--model", required=True, help="model name sent to the server; part of the resume key")
    parser.add_argument("--mode", type=int, nargs="+", required=True, choices=[1, 2, 3],
                        help="one or more teacher prompt modes")
    parser.add_argument("--output_file", help="reasons JSONL (appended to; not needed with --dry_run)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--max_retries", type=int, default=5, help="retries on 429/5xx/timeouts/connection errors")
    parser.add_argument("--backoff_base", type=float, default=1.0, help="seconds before the first retry (doubles)")
    parser.add_argument("--backoff_max", type=float, default=60.0, help="longest wait between retries")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a reply")
    parser.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS, help="images are resized to fit")
    parser.add_argument("--max_chars", type=int, default=100, help="mode 3: longest reason asked for")
    parser.add_argument("--max_tokens", type=int, default=512, help="longest reply")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--limit", type=int, help="only the first N records")
    parser.add_argument("--retry_failed", action="store_true", help="ask again for lines that failed before")
    parser.add_argument("--api_key_env", help="environment variable holding the API key (default OPENAI_API_KEY)")
    parser.add_argument("--dry_run", action="store_true", help="print the first request (images elided) and stop")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if not args.dry_run and (not args.base_url or not args.output_file):
        parser.error("--base_url and --output_file are required (unless --dry_run)")
    for name in ("concurrency", "max_chars", "max_tokens", "max_pixels"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.max_retries < 0 or args.timeout <= 0 or args.backoff_base < 0:
        parser.error("--max_retries must be >= 0, --timeout > 0 and --backoff_base >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    modes = list(dict.fromkeys(args.mode))
    records = load_records(args.input_file, args.image_dir)
    if args.limit is not None:
        records = records[: args.limit]
    check_modes(records, modes, args.input_file)
    cfg = DistillConfig(base_url=args.base_url or "", model=args.model, modes=modes, max_chars=args.max_chars,
                        max_pixels=args.max_pixels, max_tokens=args.max_tokens, temperature=args.temperature,
                        timeout=args.timeout, max_retries=args.max_retries, backoff_base=args.backoff_base,
                        backoff_max=args.backoff_max, concurrency=args.concurrency, retry_failed=args.retry_failed)
    if args.dry_run:
        request = build_request(records[0], args.image_dir, modes[0], cfg)
        print(json.dumps(elide_images(request), ensure_ascii=False, indent=2))
        print(f"dry run: {len(records) * len(modes)} requests ({len(records)} records x modes {modes})",
              file=sys.stderr)
        return 0
    api_key = api_key_from_env(args.api_key_env)
    try:
        summary = asyncio.run(run_distill(records, args.image_dir, cfg, args.output_file, api_key=api_key,
                                          progress=not args.no_progress))
    except KeyboardInterrupt:
        print(f"interrupted: finished lines are in {args.output_file}; rerun the same command to resume",
              file=sys.stderr)
        return 130
    print(format_summary(summary, args.output_file))
    failures = failure_summary(summary)
    if failures:
        print(failures, file=sys.stderr)
        return EXIT_FAILURES
    return 0


if __name__ == "__main__":
    run_cli(main)
