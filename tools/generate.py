"""Training data from any images and a prompt of your own: one teacher reply per image, exported for fine-tuning.

python -m tools.generate --image_dir photos --prompt_file ask.txt [--system_prompt_file system.txt] \\
    --base_url http://127.0.0.1:8000/v1 --model Qwen2-VL-72B-Instruct --output_file replies.jsonl \\
    [--export_dir data/gen --dataset_name gen [--export_format sharegpt|swift]]

Every image file under --image_dir (or the images of a MIRE json's records, --input_file) is sent with the prompt to
an OpenAI-compatible vision model: the image, then the prompt, after the system prompt if there is one. Replies go
to --output_file, an info file appended as each returns (tools.distill's client: concurrency, retries on
429/5xx/timeouts with Retry-After honoured, resume by image content hash, the key from $OPENAI_API_KEY or
--api_key_env never written). Rerun the same command to resume.

--export_dir writes the answered images as chat data: user "<image>" + prompt, assistant = the reply.
  sharegpt: EXPORT_DIR/NAME.json registered as NAME in EXPORT_DIR/dataset_info.json (LLaMA-Factory: dataset_dir:
            EXPORT_DIR, dataset: NAME; image paths are relative to EXPORT_DIR);
  swift:    EXPORT_DIR/NAME.jsonl in ms-swift's messages/images form, absolute image paths.
Exit codes: 0 done; 2 bad input, an --output_file of another model or prompt, or another run writing it; 3 finished
with failed images (the export holds the answered ones; rerun with --retry_failed).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Literal

from mire_factory.generate import build_image_request, check_dataset_name, export_dataset, make_prompt, run_teacher
from mire_factory.hparams import parse_args, yaml_config
from mire_factory.image_info import InfoLog, select_images
from mire_factory.io import MireInputError, run_cli
from mire_factory.teacher import (
    TeacherConfig,
    TeacherRunFields,
    api_key_from_env,
    format_summary,
    print_dry_run,
    report_failures,
)


@dataclass(kw_only=True)
class GenerateArguments(TeacherRunFields, TeacherConfig):
    """The flags (or the keys of a --config YAML): the run's, then the teacher's (TeacherRunFields, TeacherConfig)."""

    image_dir: str = field(metadata={"help": "folder of the images"})
    prompt_file: str = field(metadata={"help": "the question asked of every image (UTF-8 text)"})
    output_file: str | None = field(default=None, metadata={"help": "replies (info file, JSONL), appended to and "
                                                                    "resumed"})
    system_prompt_file: str | None = field(default=None, metadata={"help": "a system prompt (UTF-8 text)"})
    input_file: str | None = field(default=None, metadata={"help": "MIRE json: its records' images (default: every "
                                                                   "image file under --image_dir)"})
    limit: int | None = field(default=None, metadata={"help": "only the first N images"})
    export_dir: str | None = field(default=None, metadata={"help": "write the answered images as training data "
                                                                   "here"})
    dataset_name: str = field(default="generated", metadata={"help": "the exported dataset's name and file stem"})
    export_format: Literal["sharegpt", "swift"] = field(default="sharegpt", metadata={
        "help": "sharegpt (LLaMA-Factory, registered) or swift (ms-swift JSONL)"})


def check_args(args: GenerateArguments) -> None:
    problems = args.check()
    if not args.model:
        problems.append("--model is required")
    if not args.dry_run and not (args.base_url and args.output_file):
        problems.append("--base_url and --output_file are required (unless --dry_run)")
    if args.limit is not None and args.limit < 1:
        problems.append("--limit must be at least 1")
    if problems:
        raise MireInputError(problems)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(GenerateArguments, argv, __doc__, config_values=yaml_config(GenerateArguments))
    check_args(args)
    teacher = args
    if args.export_dir:
        check_dataset_name(args.dataset_name)
    prompt = make_prompt(args.prompt_file, args.system_prompt_file, extract_info=False)
    items = select_images(args.image_dir, args.input_file, limit=args.limit)
    if args.dry_run:
        return print_dry_run(build_image_request(items[0], prompt, teacher), f"{len(items)} images")
    api_key = api_key_from_env(args.api_key_env)
    summary = asyncio.run(run_teacher(items, args.output_file, teacher, prompt, api_key, args.progress))
    print(format_summary(summary, args.output_file, what="images"))
    if args.export_dir:
        latest = {(r.image, r.sha256): r for r in InfoLog(args.output_file).load(repair=False)}
        rows = [latest[key] for key in ((item.name, item.sha256) for item in items) if key in latest]
        target, n = export_dataset(rows, args.image_dir, prompt, args.export_dir, args.dataset_name,
                                   args.export_format)
        where = f"registered as {args.dataset_name} in {target.parent / 'dataset_info.json'}" \
            if args.export_format == "sharegpt" else "ms-swift messages/images"
        print(f"exported {n} answered images of {len(items)} -> {target} ({where})")
    return report_failures(summary, tool="generate", what="images")


if __name__ == "__main__":
    run_cli(main)
