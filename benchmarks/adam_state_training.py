"""What low-bit Adam states do to a real model trained on its own path (issue 20's precision question, on the CPU).

benchmarks/adam_state_error.py compares single updates at shared weights; this one lets each optimizer train its own
copy. A real pretrained Qwen2.5-0.5B language model (the GGUF of benchmarks/quality/fetch_gguf.py, dequantized, fp32)
takes STEPS steps at the recipes' learning rate on real MIRE records (their text, `<image>` placeholders dropped; loss
on the label's tokens, as in training), once per kind of Adam state, from the same weights on the same records:
  fp32                   torch's AdamW (the reference)
  8bit, 4bit             torchao's AdamW8bit, AdamW4bit (`optim: adamw_torch_8bit` / `adamw_torch_4bit`)
  8bit_fp32_embeddings,  the same with fp32 states for the input and output embeddings
  4bit_fp32_embeddings   (`mire_fp32_embedding_states`, mire_factory/embedding_states.py)
Per kind, for the input embedding, the output layer and all other weights: how far the trained weights are from the
fp32 run's (relative L2 of the weight change's difference, and its cosine), the largest change of one element over
STEPS * lr, and how many elements changed more than Adam allows (3.16 lr a step at betas 0.9/0.999, Kingma & Ba
section 2.1); the label loss on held-out records before and after; and, at every position of the held-out records,
how the trained model's next-token distribution differs from the fp32-trained one's (mean KL, top-1 agreement, the
largest probability given to a token the fp32-trained model gives under 1e-4).

    .venv/bin/python benchmarks/adam_state_training.py --data ../shared/mire_dev/train_dev.json \
        --gguf .real_models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf --out benchmarks/results/adam_state_training.json

Each kind's result is kept in --work_dir as it finishes (with the fp32 run's weight change, 2.5 GB), so a killed run
resumes at the next kind; one run at a time. Writes the JSON and a plot beside it (.png), then empties --work_dir.
About 10 min a kind on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from adam_state_error import examples, label_batch  # noqa: E402

from mire_factory.io import (  # noqa: E402
    MireInputError,
    OutputSet,
    atomic_path,
    output_lock,
    problem,
    read_json,
    run_cli,
    write_json_atomic,
)

KINDS = ("fp32", "8bit", "8bit_fp32_embeddings", "4bit", "4bit_fp32_embeddings")
GROUPS = ("input embedding", "output layer", "other weights")
ADAM_STEP_BOUND = 0.1 / math.sqrt(0.001)  # (1 - beta1) / sqrt(1 - beta2): Adam's largest step, in lr


def optimizer_for(kind: str, model, params, kwargs):
    import torch
    from torchao.optim import AdamW4bit, AdamW8bit

    from mire_factory.embedding_states import embedding_weights, keep_fp32

    if kind == "fp32":
        return torch.optim.AdamW(params, foreach=False, **kwargs)  # one tensor at a time: less memory
    optimizer = (AdamW8bit if kind.startswith("8bit") else AdamW4bit)(params, **kwargs)
    if kind.endswith("_fp32_embeddings"):
        keep_fp32(optimizer, embedding_weights(model))
    return optimizer


def group_of(model, param) -> str:
    if param is model.get_input_embeddings().weight:
        return GROUPS[0]
    return GROUPS[1] if param is model.get_output_embeddings().weight else GROUPS[2]


def label_loss(model, batches) -> float:
    import torch

    model.eval()
    losses = []
    with torch.no_grad():
        for tokens, first_label in batches:
            ids, labels = label_batch(tokens, first_label)
            losses.append(model(input_ids=ids, labels=labels).loss.item())
    model.train()
    return math.fsum(losses) / len(losses)


def agreement(model, reference, batches) -> dict:
    """How the fp32-trained model's next-token distributions and this one's differ at every position of the held-out
    records: mean KL(fp32 || this), the fraction of positions where both rank the same token first, and the largest
    probability this model gives a token the fp32 one gives less than 1e-4."""
    import torch

    kl = agree = positions = 0.0
    stray = 0.0
    model.eval()
    with torch.no_grad():
        for tokens, _ in batches:
            ids = torch.tensor([tokens])
            ref = torch.log_softmax(reference(input_ids=ids).logits[0].float(), dim=-1)
            own = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
            kl += float((ref.exp() * (ref - own)).sum())
            agree += float((ref.argmax(-1) == own.argmax(-1)).sum())
            positions += ref.shape[0]
            stray = max(stray, float(own.exp().masked_fill(ref >= math.log(1e-4), 0).max()))
    model.train()
    return {"kl_mean": kl / positions, "top1_agreement": agree / positions, "largest_stray_probability": stray}


def run_kind(kind: str, ns, train, held_out, parts: Path, loss_before: float | None) -> dict:
    """Train one copy with `kind`'s states; its result (and, for fp32, its weight change, saved for the others).
    The held-out loss before training is measured once (the fp32 run's: every run starts from the same weights)."""
    import torch
    from tqdm import tqdm

    from mire_factory.tiny_model import load_gguf_llm

    torch.manual_seed(ns.seed)
    model = load_gguf_llm(ns.gguf).float().train()
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    kwargs = dict(lr=ns.learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    optimizer = optimizer_for(kind, model, params, kwargs)
    if loss_before is None:
        loss_before = label_loss(model, held_out)
    row = {"kind": kind, "held_out_loss_before": loss_before, "train_loss": []}
    began = time.perf_counter()
    for tokens, first_label in tqdm(train, desc=kind):
        ids, labels = label_batch(tokens, first_label)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        row["train_loss"].append(loss.item())
        del loss
    row["train_s"] = time.perf_counter() - began
    row["held_out_loss_after"] = label_loss(model, held_out)
    del optimizer
    reference = None if kind == "fp32" else torch.load(parts / "fp32_delta.pt")
    bound = ADAM_STEP_BOUND * ns.learning_rate * len(train)
    sums = {g: {"diff_sq": 0.0, "dot": 0.0, "ref_sq": 0.0, "own_sq": 0.0, "max_change": 0.0, "past_bound": 0,
                "numel": 0} for g in GROUPS}
    deltas = {}
    with torch.no_grad():
        for p, p0 in zip(params, start, strict=True):
            delta = (p - p0).double()
            acc = sums[group_of(model, p)]
            acc["numel"] += delta.numel()
            acc["own_sq"] += float((delta * delta).sum())
            acc["max_change"] = max(acc["max_change"], float(delta.abs().max()))
            acc["past_bound"] += int((delta.abs() > bound).sum())
            if reference is None:
                deltas[names[id(p)]] = delta.float()
            else:
                ref = reference[names[id(p)]].double()
                acc["diff_sq"] += float(((delta - ref) ** 2).sum())
                acc["dot"] += float((delta * ref).sum())
                acc["ref_sq"] += float((ref * ref).sum())
    if reference is None:
        with atomic_path(parts / "fp32_delta.pt") as tmp:
            torch.save(deltas, tmp)
    else:
        del start
        fp32_model = load_gguf_llm(ns.gguf).float()
        with torch.no_grad():
            for name, param in fp32_model.named_parameters():
                if name in reference:
                    param.add_(reference[name])
        row["held_out_vs_fp32"] = agreement(model, fp32_model, held_out)
    row["weights"] = {}
    for group, acc in sums.items():
        out = {"numel": acc["numel"], "max_change_over_steps_lr": acc["max_change"] / (ns.learning_rate * len(train)),
               "past_adam_bound": acc["past_bound"]}
        if reference is not None:
            out["rel_l2_vs_fp32"] = math.sqrt(acc["diff_sq"] / acc["ref_sq"])
            out["cosine_vs_fp32"] = acc["dot"] / math.sqrt(acc["ref_sq"] * acc["own_sq"])
        row["weights"][group] = out
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a labelled MIRE json (its images are not read)")
    parser.add_argument("--gguf", required=True, help="the Qwen2.5-0.5B GGUF (benchmarks/quality/fetch_gguf.py)")
    parser.add_argument("--out", required=True, help="the JSON to write (a .png beside it)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps, one record each")
    parser.add_argument("--held_out", type=int, default=20, help="records not trained on, for the held-out loss")
    parser.add_argument("--max_tokens", type=int, default=384)
    parser.add_argument("--learning_rate", type=float, default=1e-5, help="the 2B and 7B recipes'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work_dir", default=str(Path(tempfile.gettempdir()) / "mire_adam_state_training"),
                        help="where finished kinds are kept until the JSON is written (resume)")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS),
                        help="the states to train with (fp32 always runs first: the others are compared to it)")
    ns = parser.parse_args(argv)
    if ns.steps < 1 or ns.held_out < 1:
        raise MireInputError(problem(ns.out, None, "--steps" if ns.steps < 1 else "--held_out", "must be at least 1"))
    if not Path(ns.gguf).is_file():
        raise MireInputError(problem(ns.gguf, None, None, "GGUF file not found (benchmarks/quality/fetch_gguf.py)"))
    kinds = ["fp32"] + [k for k in ns.kinds if k != "fp32"]
    parts = Path(ns.work_dir)

    import torch

    from mire_factory.plots import style
    from mire_factory.tiny_model import load_qwen2_tokenizer

    records = examples(ns.data, load_qwen2_tokenizer(), ns.steps + ns.held_out, ns.max_tokens, ns.seed)
    if len(records) < ns.steps + ns.held_out:
        raise MireInputError(problem(ns.data, None, "output", f"{len(records)} labelled records, "
                                     f"--steps + --held_out need {ns.steps + ns.held_out}"))
    train, held_out = records[:ns.steps], records[ns.steps:]
    with output_lock(ns.out), output_lock(parts / "run"), OutputSet() as outs:
        outs.path(ns.out)
        png = outs.path(str(Path(ns.out).with_suffix(".png")))
        settings = {"model": Path(ns.gguf).name, "data": str(ns.data), "steps": ns.steps, "held_out": ns.held_out,
                    "max_tokens": ns.max_tokens, "learning_rate": ns.learning_rate, "seed": ns.seed}
        parts.mkdir(parents=True, exist_ok=True)
        rows = {}
        for kind in kinds:
            part = parts / f"{kind}.json"
            done = read_json(part) if part.is_file() else None
            if done is not None and done.get("settings") == settings and (kind != "fp32" or
                                                                          (parts / "fp32_delta.pt").is_file()):
                rows[kind] = done["result"]
                continue
            before = rows["fp32"]["held_out_loss_before"] if rows else None
            rows[kind] = run_kind(kind, ns, train, held_out, parts, before)
            write_json_atomic(part, {"settings": settings, "result": rows[kind]})
        result = {**settings, "torch": torch.__version__, "torchao": __import__("torchao").__version__,
                  "adam_step_bound_lr": ADAM_STEP_BOUND, "kinds": rows}
        outs.write_json(ns.out, result)
        with style() as plt:
            fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
            compared = [k for k in kinds if k != "fp32"]
            for i, group in enumerate(GROUPS):
                left.bar([x + 0.25 * (i - 1) for x in range(len(compared))],
                         [rows[k]["weights"][group]["rel_l2_vs_fp32"] for k in compared], width=0.25, label=group)
            left.set_xticks(range(len(compared)), [k.replace("_fp32_", "\n+fp32 ") for k in compared], fontsize=8)
            left.set_yscale("log")
            left.set_ylabel("weight change: relative L2 distance to fp32 states'")
            left.legend(fontsize=8)
            for k in kinds:
                right.plot(range(1, ns.steps + 1), rows[k]["train_loss"], label=k, alpha=0.7)
            right.set_xlabel("optimizer step (one record)")
            right.set_ylabel("training label loss")
            right.legend(fontsize=8)
            fig.suptitle(f"Adam states on Qwen2.5-0.5B trained {ns.steps} steps on real records (lr "
                         f"{ns.learning_rate:g})")
            fig.tight_layout()
            fig.savefig(png, format="png", dpi=120)
            plt.close(fig)
        outs.commit()
    shutil.rmtree(parts, ignore_errors=True)
    summary = {k: {"held_out_loss": [round(r["held_out_loss_before"], 4), round(r["held_out_loss_after"], 4)],
                   "held_out_vs_fp32": r.get("held_out_vs_fp32"),
                   **{g: {f: round(v, 4) if isinstance(v, float) else v for f, v in w.items()}
                      for g, w in r["weights"].items()}} for k, r in rows.items()}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    run_cli(main)
