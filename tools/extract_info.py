"""The text of every image, for screenshot-text prompts (tools.convert --info_file) and for studying the data.

python -m tools.extract_info --input_file train.json --image_dir images --backend ocr --output_file info.jsonl
    [--workers N] [--threads 1] [--min_score 0.5]
python -m tools.extract_info --input_file train.json --image_dir images --backend teacher --base_url URL \\
    --model Qwen2-VL-72B-Instruct --output_file info_72b.jsonl [--prompt_file P] [--system_prompt_file S]

--backend ocr: RapidOCR (PP-OCRv4 Chinese detector and recogniser, ONNX files inside the rapidocr-onnxruntime wheel;
nothing is downloaded) in a process pool: per image the text lines in reading order, with boxes and confidences.
--backend teacher: an OpenAI-compatible vision model asked for the page's type, its type cues and its visible text as
JSON (or --prompt_file's question); the client, retries and resume are tools.distill's; the key comes from
$OPENAI_API_KEY (or --api_key_env NAME) and is never written.

Without --input_file every image file under --image_dir is read. The output is an info file (one JSON line per
image: image, sha256, text, lines | info, ...), appended as each image finishes: rerun the same command to resume;
images whose bytes were done already (under any name) are skipped. Exit codes: 0 done; 2 bad input, an
--output_file that is not an info file of the same backend, model and prompt, or another run writing it; 3 finished
with failed images (rerun with --retry_failed).
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field
from typing import Literal

from mire_factory.generate import build_image_request, make_prompt, run_teacher
from mire_factory.hparams import parse_args, yaml_config
from mire_factory.image_info import select_images
from mire_factory.io import EXIT_FAILURES, MireInputError, run_cli
from mire_factory.ocr import OcrConfig, OcrPoolError, run_ocr
from mire_factory.teacher import TeacherConfig, TeacherRunFields, api_key_from_env, print_dry_run, report_run


@dataclass(kw_only=True)
class ExtractInfoArguments(TeacherRunFields, OcrConfig, TeacherConfig):
    """The flags (or the keys of a --config YAML): the run's (TeacherRunFields: --api_key_env and --dry_run are the
    teacher backend's), then OCR's and the teacher's (OcrConfig, TeacherConfig)."""

    image_dir: str = field(metadata={"help": "folder of the images (a MIRE json's image names are relative to it)"})
    output_file: str | None = field(default=None, metadata={"help": "info file (JSONL), appended to and resumed"})
    backend: Literal["ocr", "teacher"] = field(default="ocr", metadata={"help": "local OCR, or a teacher model"})
    input_file: str | None = field(default=None, metadata={"help": "MIRE json: its records' images (default: every "
                                                                   "image file under --image_dir)"})
    task: Literal["all", "image", "dialogue"] = field(default="all", metadata={"help": "with --input_file: only the "
                                                                                       "images of this task"})
    limit: int | None = field(default=None, metadata={"help": "only the first N images"})
    prompt_file: str | None = field(default=None, metadata={"help": "teacher: the question asked of each image "
                                                                    "(default: type cues and visible text as JSON)"})
    system_prompt_file: str | None = field(default=None, metadata={"help": "teacher: a system prompt"})


def check_args(args: ExtractInfoArguments) -> None:
    problems = OcrConfig.check(args) if args.backend == "ocr" else TeacherConfig.check(args)
    if args.backend == "teacher" and not args.dry_run and not (args.base_url and args.model):
        problems.append("--backend teacher needs --base_url and --model")
    if args.backend == "teacher" and args.dry_run and not args.model:
        problems.append("--model is required")
    if not args.output_file and not args.dry_run:
        problems.append("--output_file is required")
    if args.backend == "ocr" and (args.prompt_file or args.system_prompt_file or args.dry_run):
        problems.append("--prompt_file, --system_prompt_file and --dry_run are for --backend teacher")
    if args.limit is not None and args.limit < 1:
        problems.append("--limit must be at least 1")
    if problems:
        raise MireInputError(problems)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(ExtractInfoArguments, argv, __doc__, config_values=yaml_config(ExtractInfoArguments))
    check_args(args)
    items = select_images(args.image_dir, args.input_file, args.task, args.limit)
    if args.backend == "ocr":
        try:
            summary = run_ocr(items, args.output_file, args, retry_failed=args.retry_failed,
                              progress=args.progress)
        except OcrPoolError as exc:
            print(f"extract_info stopped: {exc}; finished images are in {args.output_file}: rerun to resume",
                  file=sys.stderr)
            return EXIT_FAILURES
    else:
        prompt = make_prompt(args.prompt_file, args.system_prompt_file, extract_info=True)
        if args.dry_run:
            return print_dry_run(build_image_request(items[0], prompt, args), f"{len(items)} images")
        api_key = api_key_from_env(args.api_key_env)
        summary = asyncio.run(run_teacher(items, args.output_file, args, prompt, api_key, args.progress,
                                          tool="tools.extract_info"))
    return report_run(summary, args.output_file, tool="extract_info", what="images")


if __name__ == "__main__":
    run_cli(main)
