"""hf backend, --constrained: our grammar engine (infer/constrained.py) against xgrammar (vLLM's), same answers?

python -m benchmarks.constrained_engines [--model DIR] [--repeats 3] [--batch_size 8] [--sources synthetic mire_sample]
    [--cases plain:12 cot:48 cot:100] [--out constrained_engines.json]
    (--sources also takes mire_dev: the 599 real records of ../shared/mire_dev, not a default: minutes, not seconds)

Needs `pip install xgrammar` (not a project dependency: this script decides whether it should be one). Model: the
tests' random-weight tiny Qwen2-VL (`make_tiny_model --preset tiny`) unless --model is given. Records: what the CPU
tests constrain, the 24 real records of ../shared/mire_sample (when present) and 14 synthetic ones, each converted
with the `plain` prompt variant (label answers, --max_new_tokens 12) and the `cot` one (JSON answers, 48 and 100
new tokens). Both engines decode greedily from the same prepared, length-sorted batches (hf_backend.prepare_batch);
only the constraint differs:
- ours: the label trie (transformers' prefix_allowed_tokens_fn) or the CoT byte grammar (GrammarLogitsProcessor),
  as hf_backend.generate_prepared wires them;
- xgrammar: `xgrammar.contrib.hf.LogitsProcessor` over the languages the vLLM backend asks xgrammar for (the labels;
  the CoT regex of answer.guided_decoding, whose reason is capped in characters), stop token <|im_end|>.
Reports per case: answers equal (count), answers valid (parse to a label of the record's task), seconds to build the
constraints (once per process) and to generate (best of --repeats; wall and this process's CPU seconds), tokens
generated and CPU milliseconds per token (the engines make answers of different lengths).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mire_factory.answers import is_strict_answer  # noqa: E402
from mire_factory.convert import convert  # noqa: E402
from mire_factory.infer.answer import AnswerConstraints, guided_decoding  # noqa: E402
from mire_factory.infer.args import InferArgs  # noqa: E402
from mire_factory.infer.constrained import GrammarLogitsProcessor, make_prefix_allowed_tokens_fn  # noqa: E402
from mire_factory.infer.hf_backend import GenItem, length_sorted_batches, load_hf_model, prepare_batch  # noqa: E402
from mire_factory.infer.pipeline import dataset_variant, prepare  # noqa: E402
from mire_factory.io import OutputSet, run_cli  # noqa: E402
from mire_factory.sharegpt import read_sharegpt  # noqa: E402
from mire_factory.taxonomy import LABELS  # noqa: E402

SAMPLE = REPO.parent / "shared" / "mire_sample"
DEV = REPO.parent / "shared" / "mire_dev"


class Ours:
    name = "ours"

    def __init__(self, comp, answer_format: str, label_position: str):
        start = time.perf_counter()
        self.constraints = AnswerConstraints(comp.tokenizer, comp.stop_id, answer_format, label_position)
        if answer_format == "cot":  # the vocabulary tables are built on first use: count them here
            GrammarLogitsProcessor([], 0, comp.tokenizer, comp.stop_id, 1)
        self.build_s = time.perf_counter() - start
        self.comp, self.answer_format = comp, answer_format

    def kwargs(self, tasks: list[str], width: int, max_new_tokens: int) -> dict:
        from transformers import LogitsProcessorList

        c, comp = self.constraints, self.comp
        if self.answer_format == "label":
            tries = [c.tries[t] for t in tasks]
            pad_id = comp.tokenizer.pad_token_id
            return {"prefix_allowed_tokens_fn": make_prefix_allowed_tokens_fn(tries, width, pad_id)}
        grammars = [c.grammars[t] for t in tasks]
        return {"logits_processor": LogitsProcessorList(
            [GrammarLogitsProcessor(grammars, width, comp.tokenizer, comp.stop_id, max_new_tokens)])}


class Xgrammar:
    name = "xgrammar"

    def __init__(self, comp, model, answer_format: str, label_position: str, max_new_tokens: int):
        import xgrammar as xgr

        start = time.perf_counter()
        info = xgr.TokenizerInfo.from_huggingface(comp.tokenizer, vocab_size=model.config.get_text_config().vocab_size,
                                                  stop_token_ids=[comp.stop_id])
        compiler = xgr.GrammarCompiler(info)
        self.grammars = {}
        for task in LABELS:
            if answer_format == "label":
                regex = "(" + "|".join(re.escape(label) for label in LABELS[task]) + ")"
            else:
                regex = guided_decoding(task, "cot", label_position, max_new_tokens)["regex"]
            self.grammars[task] = compiler.compile_regex(regex)
        self.build_s = time.perf_counter() - start

    def kwargs(self, tasks: list[str], width: int, max_new_tokens: int) -> dict:
        from transformers import LogitsProcessorList
        from xgrammar.contrib.hf import LogitsProcessor

        return {"logits_processor": LogitsProcessorList([LogitsProcessor([self.grammars[t] for t in tasks])])}


def generate_all(model, comp, batches, engine, max_new_tokens: int) -> tuple[dict[int, str], float, float, int]:
    """Answers by record index, wall and CPU seconds (this process, all its threads: what other work on the machine
    changes least), and tokens generated (up to each row's stop token)."""
    import torch

    answers, tokens, start, cpu = {}, 0, time.perf_counter(), time.process_time()
    stop_ids = comp.template.get_stop_token_ids(comp.tokenizer)
    for indices, batch in batches:
        with torch.inference_mode():
            out = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=stop_ids,
                                 pad_token_id=comp.tokenizer.pad_token_id, **(batch.mm or {}),
                                 **engine.kwargs(batch.tasks, batch.width, max_new_tokens))
        new = out[:, batch.width:]
        texts = comp.tokenizer.batch_decode(new, skip_special_tokens=True)
        answers.update(zip(indices, texts, strict=True))
        for row in new.tolist():
            tokens += row.index(comp.stop_id) + 1 if comp.stop_id in row else len(row)
    return answers, time.perf_counter() - start, time.process_time() - cpu, tokens


def run_case(model_dir: str, dataset_dir: Path, max_new_tokens: int, batch_size: int, repeats: int, model=None):
    args = InferArgs(model_name_or_path=model_dir, dataset="mire_test", dataset_dir=str(dataset_dir), backend="hf",
                     cutoff_len=1024, max_new_tokens=max_new_tokens, image_max_pixels=65536, batch_size=batch_size)
    variant = dataset_variant(args)
    records = read_sharegpt(args.dataset, args.dataset_dir)
    comp, plans, prompt_ids = prepare(args, records)
    model = model or load_hf_model(comp)
    items = [GenItem(ids, p.images, r.task) for r, p, ids in zip(records, plans, prompt_ids, strict=True)]
    batches = [(b, prepare_batch(comp, [items[i] for i in b]))
               for b in length_sorted_batches([p.n_tokens for p in plans], batch_size)]
    engines = [Ours(comp, variant.answer_format, variant.label_position),
               Xgrammar(comp, model, variant.answer_format, variant.label_position, max_new_tokens)]
    result = {"records": len(records), "prompt_variant": variant.name, "max_new_tokens": max_new_tokens}
    answers = {}
    for engine in engines:
        times, cpu_times = [], []
        for _ in range(repeats):
            answers[engine.name], seconds, cpu_s, tokens = generate_all(model, comp, batches, engine, max_new_tokens)
            times.append(seconds)
            cpu_times.append(cpu_s)
        invalid = [(r.id, answers[engine.name][i]) for i, r in enumerate(records)
                   if not is_strict_answer(answers[engine.name][i], r.task, variant.answer_format)]
        result[engine.name] = {"build_s": round(engine.build_s, 3), "generate_s": round(min(times), 3),
                               "generate_s_all": [round(t, 3) for t in times],
                               "generate_cpu_s": round(min(cpu_times), 3),
                               "tokens": tokens, "cpu_ms_per_token": round(1000 * min(cpu_times) / max(tokens, 1), 2),
                               "valid": len(records) - len(invalid), "invalid": invalid[:5]}
    same = [i for i in range(len(records)) if answers["ours"][i] == answers["xgrammar"][i]]
    result["same_answers"] = len(same)
    result["differing"] = [{"id": records[i].id, "ours": answers["ours"][i], "xgrammar": answers["xgrammar"][i]}
                           for i in range(len(records)) if i not in same][:5]
    return result, model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a Qwen2-VL checkpoint; default: the tests' random-weight tiny model")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--sources", nargs="+", choices=["synthetic", "mire_sample", "mire_dev"], default=["synthetic", "mire_sample"])
    cases = ["plain:12", "cot:48", "cot:100"]
    p.add_argument("--cases", nargs="+", choices=cases, default=cases, help="prompt variant:max_new_tokens")
    p.add_argument("--out", default="constrained_engines.json")
    args = p.parse_args(argv)
    with OutputSet() as outs:
        staged = outs.path(args.out)  # an unwritable --out fails now, not after minutes
        summary = measure(args)
        staged.write_text(json.dumps(summary, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


def measure(args) -> dict:
    from importlib.metadata import version

    import torch

    work = Path(tempfile.mkdtemp(prefix="constrained_engines_"))
    model_dir = args.model
    if model_dir is None:
        from mire_factory.tiny_model import make_tiny_model

        model_dir = str(make_tiny_model(work / "tiny", preset="tiny", seed=0))
    from mire_factory.synthetic import make_records, write_dataset

    write_dataset(work / "synthetic.json", make_records(5, 9, work / "images", seed=7, image_size=(96, 64),
                                                        max_dialogue_images=3, with_labels=False))
    sources = {"synthetic": (work / "synthetic.json", work / "images")}
    if (SAMPLE / "train_sample.json").is_file():
        sources["mire_sample"] = (SAMPLE / "train_sample.json", SAMPLE / "images")
    if (DEV / "train_dev.json").is_file():
        sources["mire_dev"] = (DEV / "train_dev.json", DEV / "images")
    sources = {name: paths for name, paths in sources.items() if name in args.sources}
    cases, model = [], None
    for name, (input_file, image_dir) in sources.items():
        for variant, new_tokens in ((c.split(":")[0], int(c.split(":")[1])) for c in args.cases):
            ds = work / f"{name}_{variant}"
            if not ds.exists():
                convert(input_file, image_dir, ds, val_size=0, kind="test", prompt_variant=variant)
            result, model = run_case(model_dir, ds, new_tokens, args.batch_size, args.repeats, model)
            cases.append({"records_from": name, **result})
            print(json.dumps(cases[-1], ensure_ascii=False), flush=True)
    summary = {"torch": torch.__version__, "xgrammar": version("xgrammar"), "threads": torch.get_num_threads(),
               "cpu": platform.processor() or platform.machine(), "model": args.model or "tiny (random weights)",
               "cases": cases}
    return summary


if __name__ == "__main__":
    run_cli(main)
