"""The official MIRE metric during training: at each evaluation, greedy-generate a label for every validation record
and log weighted F1 per task and their mean into the trainer's log history (hence trainer_state.json).

Prompts are the validation samples exactly as LLaMA-Factory tokenized them with the training template (the
input_ids before the first supervised label), batched by LLaMA-Factory's own data collator (which builds
pixel_values / image_grid_thw per sample), left-padded for generation.

Several processes (torchrun): each rank generates for its own shard and the results are all-gathered, so every rank
computes the same metrics (metric_for_best_model and early stopping then agree across ranks). Under DeepSpeed
ZeRO-3 (or FSDP) every forward pass gathers parameters from all ranks, so all ranks must run the same number of
generate calls: shards are padded to equal length with repeats of a real sample (their outputs are discarded), and
transformers' generate turns on `synced_gpus` itself in that case, keeping ranks stepping together until the
longest answer on any rank is done.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from .answers import extract_answer, read_answer
from .io import write_jsonl_atomic
from .mrope import mrope_generate_kwargs
from .rules import MAX_NEW_TOKENS
from .scoring import score
from .taxonomy import task_of_label

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# collator outputs that generate must not get: they are positions for one forward pass over the whole sequence;
# generate derives its own from image_grid_thw, the attention mask and mm_token_type_ids (mrope.py)
DROP_KEYS = ("labels", "position_ids", "rope_deltas", "has_dummy_image")


def split_prompt(input_ids: Sequence[int], labels: Sequence[int]) -> tuple[list[int], list[int]] | None:
    """(prompt ids, answer ids) of a training sample: everything before its first supervised token, and the first
    assistant turn (the first run of supervised tokens: what inference generates; a row of tools.merge_cot --layout
    second_turn trains a second turn, the reason, after it); None when cutoff_len left no answer."""
    start = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)
    if start is None:
        return None
    end = next((i for i in range(start, len(labels)) if labels[i] == IGNORE_INDEX), len(labels))
    return list(input_ids[:start]), list(labels[start:end])


def shard_indices(indices: Sequence[int], rank: int, world: int) -> tuple[list[int], int]:
    """This rank's share, padded to the same length on every rank; returns (indices, how many are real)."""
    per_rank = math.ceil(len(indices) / world)
    mine = list(indices[rank::world])
    real = len(mine)
    filler = mine[0] if mine else indices[0]
    return mine + [filler] * (per_rank - real), real


def metric_prefix(metrics: dict | None) -> str:
    """eval, or eval_NAME when LLaMA-Factory evaluates several datasets separately."""
    for key in metrics or {}:
        if key.endswith("_runtime"):
            return key[: -len("_runtime")]
    return "eval"


def f1_metrics(gold_texts: Sequence[str], pred_texts: Sequence[str], prefix: str = "eval") -> tuple[dict, list[dict]]:
    """Scores as tools.cal_acc computes them by default: answers read by answers.read_answer for the gold's task
    (CoT JSON parsed, near misses fixed, the rest invalid). Returns (flat metrics for the log, one row per record)."""
    golds, preds, tasks, rows = [], [], [], []
    for gold_text, pred_text in zip(gold_texts, pred_texts, strict=True):
        gold = extract_answer(gold_text)
        task = task_of_label(gold)
        answer = read_answer(pred_text, task) if task else None
        rows.append({"gold": gold, "task": task, "raw": pred_text,
                     "predict": answer.label if answer else extract_answer(pred_text),
                     "how": answer.how if answer else None})
        if task:
            golds.append(gold)
            preds.append(answer.scored)
            tasks.append(task)
    if not golds:
        return {}, rows
    result = score(golds, preds, tasks)
    out = {f"{prefix}_f1": result["overall"]["f1"]}
    for task in ("image", "dialogue"):
        if result[task] is not None:
            out[f"{prefix}_f1_{task}"] = result[task]["f1"]
            out[f"{prefix}_acc_{task}"] = result[task]["accuracy"]
    out[f"{prefix}_f1_pooled"] = result["pooled"]["f1"]
    return {k: round(v, 4) for k, v in out.items()}, rows


class F1Callback(TrainerCallback):
    def __init__(self, max_new_tokens: int = MAX_NEW_TOKENS, max_samples: int | None = None,
                 save_predictions: bool = True):
        if not 0 < max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"max_new_tokens must be in 1..{MAX_NEW_TOKENS}, got {max_new_tokens}")
        self.max_new_tokens = max_new_tokens
        self.max_samples = max_samples
        self.save_predictions = save_predictions
        self._last = None  # ((step, prefix, eval set size), (metrics, rows)) of the latest evaluation

    def on_evaluate(self, args, state, control, metrics=None, model=None, eval_dataloader=None, **kwargs):
        if model is None or eval_dataloader is None:
            logger.warning("F1Callback: no model or eval dataloader at evaluation; F1 skipped")
            return
        collator = eval_dataloader.collate_fn
        dataset = eval_dataloader.dataset
        if not hasattr(collator, "template") or not hasattr(collator, "tokenizer"):
            raise TypeError(f"F1Callback needs LLaMA-Factory's multimodal collator, got {type(collator).__name__}")
        prefix = metric_prefix(metrics)
        key = (state.global_step, prefix, len(dataset))
        if self._last is not None and self._last[0] == key and not args.load_best_model_at_end:
            # LLaMA-Factory's final trainer.evaluate() right after an evaluation at the last step: the same weights
            # and greedy decoding give the same answers, so they are not generated twice (on a GPU, minutes at 7B)
            new, rows = self._last[1]
        else:
            new, rows = self.evaluate_f1(args, model, collator, dataset, prefix, state.is_world_process_zero)
            self._last = (key, (new, rows))
        if not new:
            return
        if metrics is not None:
            metrics.update(new)  # the dict the trainer keeps: metric_for_best_model=eval_f1 and early stopping see it
        last = state.log_history[-1] if state.log_history else {}
        if last.get("step") == state.global_step and f"{prefix}_loss" in last:
            last.update(new)  # one eval entry per step: loss and F1 side by side
        else:
            state.log_history.append({**new, "epoch": state.epoch, "step": state.global_step})
        if state.is_world_process_zero:
            logger.warning("step %d: %s", state.global_step, new)
            if self.save_predictions:
                path = os.path.join(args.output_dir, "f1_eval", f"{prefix}_step{state.global_step}.jsonl")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                write_jsonl_atomic(path, rows)

    @torch.no_grad()
    def evaluate_f1(self, args, model, collator, dataset, prefix: str, is_main: bool) -> tuple[dict, list[dict]]:
        tokenizer = collator.tokenizer
        samples = []  # (dataset index, prompt ids, gold text)
        for i in range(len(dataset)):
            example = dataset[i]
            parts = split_prompt(example["input_ids"], example["labels"])
            if parts is not None:
                samples.append((i, parts[0], tokenizer.decode(parts[1], skip_special_tokens=True)))
        if self.max_samples:
            samples = samples[: self.max_samples]
        if not samples:
            logger.warning("F1Callback: no validation sample has a label left after cutoff_len; F1 skipped")
            return {}, []

        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        # longest prompts first: similar lengths batch together, and a memory problem shows at once
        order = sorted(range(len(samples)), key=lambda k: -len(samples[k][1]))
        mine, real = shard_indices(order, rank, world)
        batch_size = max(1, args.per_device_eval_batch_size)

        was_training = model.training
        model.eval()
        padding_side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        stop_ids = collator.template.get_stop_token_ids(tokenizer)
        autocast = (
            torch.autocast(args.device.type, dtype=torch.bfloat16 if args.bf16 else torch.float16)
            if (args.bf16 or args.fp16) and args.device.type != "cpu"
            else torch.autocast("cpu", enabled=False)
        )
        local: list[tuple[int, str]] = []
        try:
            from tqdm import tqdm

            batches = range(0, len(mine), batch_size)
            for start in tqdm(batches, desc="F1 eval: generating", disable=not is_main):
                chunk = mine[start : start + batch_size]
                features = []
                for k in chunk:
                    example = dataset[samples[k][0]]
                    prompt = samples[k][1]
                    features.append({
                        "input_ids": prompt,
                        "attention_mask": [1] * len(prompt),
                        "labels": [IGNORE_INDEX] * len(prompt),
                        "images": example.get("images") or [],
                        "videos": example.get("videos") or [],
                        "audios": example.get("audios") or [],
                    })
                batch = collator(features)
                for key in DROP_KEYS:
                    batch.pop(key, None)
                batch = {k: v.to(args.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                batch.update(mrope_generate_kwargs(model, collator.processor, batch["input_ids"]))
                with autocast:
                    out = model.generate(
                        **batch,
                        max_new_tokens=self.max_new_tokens,
                        do_sample=False,
                        num_beams=1,
                        eos_token_id=stop_ids,
                        pad_token_id=tokenizer.pad_token_id,
                        use_cache=True,
                    )
                texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
                for pos, (k, text) in enumerate(zip(chunk, texts, strict=True)):
                    if start + pos < real:  # shard padding is discarded
                        local.append((k, text.strip()))
        finally:
            tokenizer.padding_side = padding_side
            if was_training:
                model.train()

        if world > 1:
            gathered: list = [None] * world
            dist.all_gather_object(gathered, local)
            local = [item for part in gathered for item in part]
        pred_of = dict(local)
        golds = [samples[k][2] for k in range(len(samples))]
        preds = [pred_of[k] for k in range(len(samples))]
        new, rows = f1_metrics(golds, preds, prefix)
        for k, row in enumerate(rows):
            row["index"] = samples[k][0]
        return new, rows
