"""How far 8-bit and fp8 Adam states move AdamW's updates, on the gradients of a real pretrained model and real
records (issue 20's precision question for `mire_fp8_adam_states`, asked on the CPU before a GPU loss run).

A real pretrained Qwen2.5-0.5B language model (the GGUF of benchmarks/quality/fetch_gguf.py, dequantized, trained in
fp32) takes STEPS optimizer steps of fp32 AdamW (torch's, the reference) on real MIRE records: the text of each
record (its `<image>` placeholders dropped: the language model alone), the loss on the label's tokens as in training.
torchao's AdamW8bit and AdamWFp8 are given the same gradients at the same weights every step (their own states
carried over from step to step, as in a run, but their weights put back on the reference's path), so what differs is
the states' format alone. Per step and optimizer: the relative L2 error and the cosine of its update against the
reference's, and the largest ratio of an element's update to the reference's largest (Adam bounds an update near
the learning rate: a second moment rounded to zero makes one far larger); at the end, per state, the fraction of
elements the reference holds non-zero that the quantized state holds as zero.

    .venv/bin/python benchmarks/adam_state_error.py --data ../shared/mire_dev/train_dev.json \
        --gguf .real_models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf --out benchmarks/results/adam_state_error.json

Writes the JSON and a plot beside it (.png). About 15 s a step on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mire_factory.io import MireInputError, OutputSet, problem, run_cli  # noqa: E402
from mire_factory.records import load_records  # noqa: E402


def examples(data: str, tokenizer, n: int, max_tokens: int, seed: int) -> list[tuple[list[int], int]]:
    """(token ids, first label position) of n random labelled records, each cut to its last max_tokens tokens."""
    records = [r for r in load_records(data, decode_images=False) if r.output]
    random.Random(seed).shuffle(records)
    out = []
    for record in records[:n]:
        user = [{"role": "user", "content": record.instruction.replace("<image>", "")}]
        prompt = tokenizer.apply_chat_template(user, tokenize=True, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": record.output}], tokenize=True)
        prompt, full = list(getattr(prompt, "input_ids", prompt)), list(getattr(full, "input_ids", full))
        cut = max(0, len(full) - max_tokens)
        out.append((full[cut:], max(1, len(prompt) - cut)))
    return out


def label_batch(tokens: list[int], first_label: int):
    """(input_ids, labels) of one example: the loss on the label's tokens only, as in training."""
    import torch

    ids = torch.tensor([tokens])
    labels = ids.clone()
    labels[0, :first_label] = -100
    return ids, labels


def dequantized(state):
    """An Adam state as fp32 (torchao's quantized states dequantize themselves)."""
    import torch

    return state.dequantize() if type(state) is not torch.Tensor else state.float()


def reference_update(optimizer, param, kwargs):
    """The update fp32 AdamW (weight decay 0) just made to `param`, from its states (the weights before it are not
    kept: no room): -lr * m / bias1 / (sqrt(v / bias2) + eps), as torch computes it."""
    import torch

    state = optimizer.state[param]
    step = float(state["step"])
    beta1, beta2 = kwargs["betas"]
    denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** step)).add_(kwargs["eps"])
    return torch.div(state["exp_avg"], denom).mul_(-kwargs["lr"] / (1 - beta1 ** step))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a labelled MIRE json (its images are not read)")
    parser.add_argument("--gguf", required=True, help="the Qwen2.5-0.5B GGUF (benchmarks/quality/fetch_gguf.py)")
    parser.add_argument("--out", required=True, help="the JSON to write (a .png beside it)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max_tokens", type=int, default=384)
    parser.add_argument("--learning_rate", type=float, default=1e-5, help="the 2B and 7B recipes'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--states", nargs="+", choices=["8bit", "fp8"], default=["8bit", "fp8"],
                        help="the quantized states to measure (each keeps a copy of the weights)")
    ns = parser.parse_args(argv)
    if not Path(ns.gguf).is_file():
        raise MireInputError(problem(ns.gguf, None, None, "GGUF file not found (benchmarks/quality/fetch_gguf.py)"))

    import torch
    from torchao.optim import AdamW8bit, AdamWFp8
    from tqdm import tqdm

    from mire_factory.plots import style
    from mire_factory.tiny_model import load_gguf_llm, load_qwen2_tokenizer

    with OutputSet() as outs:
        outs.path(ns.out)
        outs.path(str(Path(ns.out).with_suffix(".png")))
        torch.manual_seed(ns.seed)
        tokenizer = load_qwen2_tokenizer()
        batches = examples(ns.data, tokenizer, ns.steps, ns.max_tokens, ns.seed)
        model = load_gguf_llm(ns.gguf).float().train()
        params = [p for p in model.parameters() if p.requires_grad]
        kwargs = dict(lr=ns.learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        reference = torch.optim.AdamW(params, foreach=False, **kwargs)  # one tensor at a time: less memory
        shadows = {}
        for name, cls in (("8bit", AdamW8bit), ("fp8", AdamWFp8)):
            if name not in ns.states:
                continue
            copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
            shadows[name] = (cls(copies, **kwargs), copies)
        steps = []
        start = time.perf_counter()
        for tokens, first_label in tqdm(batches, desc="steps"):
            ids, labels = label_batch(tokens, first_label)
            model.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            row = {"loss": loss.item(), "label_tokens": len(tokens) - first_label}
            sums = {name: [0.0, 0.0, 0.0, 0.0] for name in shadows}  # |u-r|^2, u.r, |u|^2, max |u|
            for optimizer, copies in shadows.values():
                with torch.no_grad():
                    for c, p in zip(copies, params, strict=True):
                        c.copy_(p)
                        c.grad = p.grad  # shared: no optimizer writes to a gradient
                optimizer.step()
                with torch.no_grad():  # each copy now holds its update (0.5B in fp32: no room for more copies)
                    for c, p in zip(copies, params, strict=True):
                        c.sub_(p)
                        c.grad = None
            reference.step()
            model.zero_grad(set_to_none=True)  # 2.5 GB back before the sums (24 GB held 0.5B and three optimizers)
            del loss
            with torch.no_grad():  # sums over every parameter, one tensor at a time
                ref_sq = ref_max = 0.0
                for i, p in enumerate(params):
                    r = reference_update(reference, p, kwargs).double()
                    ref_sq += float((r * r).sum())
                    ref_max = max(ref_max, float(r.abs().max()))
                    for name, (_, copies) in shadows.items():
                        u = copies[i].double()
                        acc = sums[name]
                        acc[0] += float(((u - r) ** 2).sum())
                        acc[1] += float((u * r).sum())
                        acc[2] += float((u * u).sum())
                        acc[3] = max(acc[3], float(u.abs().max()))
                for name, (diff_sq, dot, upd_sq, upd_max) in sums.items():
                    row[name] = {"rel_l2": math.sqrt(diff_sq / ref_sq),
                                 "cosine": dot / math.sqrt(upd_sq * ref_sq),
                                 "max_update_over_reference_max": upd_max / ref_max}
            steps.append(row)
        zeroed = {}
        with torch.no_grad():  # one tensor at a time
            for name, (optimizer, copies) in shadows.items():
                zeroed[name] = {}
                for key in ("exp_avg", "exp_avg_sq"):
                    nonzero = lost = 0
                    for p, c in zip(params, copies, strict=True):
                        ref, got = reference.state[p][key], dequantized(optimizer.state[c][key])
                        nonzero += int((ref != 0).sum())
                        lost += int(((ref != 0) & (got == 0)).sum())
                    zeroed[name][key] = lost / max(nonzero, 1)

        def spread(name: str, field: str) -> dict:
            values = sorted(s[name][field] for s in steps)
            return {"min": values[0], "median": values[len(values) // 2], "max": values[-1],
                    "mean": math.fsum(values) / len(values)}

        result = {
            "model": Path(ns.gguf).name, "data": str(ns.data), "steps": len(steps), "max_tokens": ns.max_tokens,
            "learning_rate": ns.learning_rate, "seed": ns.seed, "torch": torch.__version__,
            "torchao": __import__("torchao").__version__, "wall_s": time.perf_counter() - start,
            "summary": {name: {field: spread(name, field) for field in ("rel_l2", "cosine",
                                                                        "max_update_over_reference_max")}
                        for name in shadows},
            "zeroed_state_fraction": zeroed,
            "per_step": steps,
        }
        outs.write_json(ns.out, result)
        with style() as plt:
            fig, ax = plt.subplots(figsize=(7, 4))
            for name in shadows:
                ax.plot(range(1, len(steps) + 1), [s[name]["rel_l2"] for s in steps], marker="o", label=name)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("relative L2 error of the update")
            ax.set_title("AdamW update error of quantized states vs fp32 states (Qwen2.5-0.5B, real records)")
            ax.grid(alpha=0.3)
            ax.legend()
            fig.tight_layout()
            png = str(Path(ns.out).with_suffix(".png"))
            fig.savefig(outs.path(png), format="png", dpi=120)
            plt.close(fig)
        outs.commit()
    print(json.dumps({"summary": result["summary"], "zeroed_state_fraction": zeroed}, indent=1))
    return 0


if __name__ == "__main__":
    run_cli(main)
