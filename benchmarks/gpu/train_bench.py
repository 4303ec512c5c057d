"""Training throughput of a recipe, measured inside LLaMA-Factory's own run_exp.

python benchmarks/gpu/train_bench.py --out RESULT.json --warmup_steps 3 CONFIG.yaml [key=value ...]

The YAML and overrides are read exactly as `llamafactory-cli train` reads them. A callback times every optimizer
step, counts non-padding input tokens (include_num_input_tokens_seen) and the peak GPU memory. MFU counts the
language model only, 6 x (LLM parameters) per input token (image tokens included), against the device's dense bf16
peak: the frozen vision tower's forward FLOPs are left out, so the figure is a lower bound.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from transformers import TrainerCallback  # noqa: E402

from mire_factory import (  # noqa: E402
    attention,
    checkpoint_layers,
    fp8_adam_states,
    liger_layers,
    master_weights,
    pack_padding,
)
from mire_factory import embedding_states as embedding_states_module  # noqa: E402
from mire_factory import label_logits as label_logits_module  # noqa: E402
from mire_factory.io import MireInputError, OutputSet, problem, run_cli  # noqa: E402
from mire_factory.train import OptimizerReport, own_flag, read_config, set_cudnn_sdp  # noqa: E402

DENSE_BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


class PackedCounts:
    """Real tokens and records of packed micro-batches, read off the 4D mask the model is given: LLaMA-Factory pads
    every pack to cutoff_len, and the Trainer's own count sums that float mask (about -1e18)."""

    def __init__(self):
        self.tokens = 0
        self.records = 0

    def hook(self, module, args, kwargs):
        import torch

        mask = kwargs.get("attention_mask")
        if not module.training or mask is None or mask.dim() != 4:
            return
        visible = mask[:, 0] == 0 if mask.dtype != torch.bool else mask[:, 0]
        real = pack_padding.real_tokens(mask)
        starts = real.clone()  # a record starts at a real token that cannot see the one before it
        starts[:, 1:] &= ~visible[:, 1:, :-1].diagonal(dim1=-2, dim2=-1)
        self.tokens += int(real.sum())
        self.records += int(starts.sum())


class StepTimer(TrainerCallback):
    def __init__(self, packed: bool = False):
        self.step_times: list[float] = []
        self.tokens: list[int] = []
        self.records: list[int] = []
        self.packed = PackedCounts() if packed else None
        self._t0 = None
        self._tok0 = self._rec0 = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.packed is not None:
            model.register_forward_pre_hook(self.packed.hook, with_kwargs=True)

    def _counts(self, state) -> tuple[int, int]:
        if self.packed is not None:
            return self.packed.tokens, self.packed.records
        return state.num_input_tokens_seen, 0

    def on_step_begin(self, args, state, control, **kwargs):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()
        self._tok0, self._rec0 = self._counts(state)

    def on_step_end(self, args, state, control, **kwargs):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.step_times.append(time.perf_counter() - self._t0)
        tokens, records = self._counts(state)
        self.tokens.append(tokens - self._tok0)
        self.records.append(records - self._rec0)


class StepProfiler(TrainerCallback):
    """torch.profiler over one optimizer step, the last warm-up one (untimed, so the figures keep no profiler
    overhead): where a step's time goes, by kernel, and how much of the step the GPU was busy at all."""

    def __init__(self, step: int):
        self.step, self.summary, self._prof, self._t0 = step, None, None, 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        import torch

        if state.global_step != self.step:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(activities=activities)
        self._prof.__enter__()
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        import torch

        if self._prof is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self._t0
        self._prof.__exit__(None, None, None)
        events = self._prof.key_averages()
        # kernels only (device-type events): an op's row holds its kernels' time too, so summing every row counts
        # it twice (the eighth lease's JSONs did: their gpu_busy_s is about twice the kernels' time)
        busy_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        self.summary = {"step": self.step, "wall_s": wall, "gpu_busy_s": busy_us / 1e6,
                        "gpu_busy_fraction": busy_us / 1e6 / wall if wall else None,
                        "table": events.table(sort_by=sort, row_limit=40, max_name_column_width=70)}
        self._prof = None


def count_params(model_dir: str) -> dict:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    t, v = cfg.text_config, cfg.vision_config
    d, inter, layers = t.hidden_size, t.intermediate_size, t.num_hidden_layers
    kv = d // t.num_attention_heads * t.num_key_value_heads
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * inter
    embed = t.vocab_size * d * (1 if cfg.tie_word_embeddings else 2)
    e = v.embed_dim
    vision = v.depth * (4 * e * e + 2 * e * e * v.mlp_ratio) + (e * 4) * (e * 4) + e * 4 * v.hidden_size
    return {"llm_params": layers * per_layer + embed, "output_layer_params": t.vocab_size * d,
            "vision_params": vision, "patch_size": v.patch_size}


class ResultWriter(TrainerCallback):
    """Writes the figures when training ends, before run_sft saves the model: a failed save (a full disk on the lent
    machine lost the 11-image run's figures once) must not lose them."""

    def __init__(self, write, skip_save: bool = False):
        self.write, self.written, self.skip_save = write, False, skip_save

    def on_train_end(self, args, state, control, **kwargs):
        self.write()
        self.written = True
        if self.skip_save:  # every rank leaves here, so that none waits at a barrier of the save
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)


def bench_result(ns, args, timer, report, wall: float, profiler: StepProfiler | None = None,
                 right_pad=None, label_logits=None, checkpointing=None, trim=None, masters=None,
                 liger=None, embedding_states=None) -> dict | None:
    """The figures (None on ranks other than 0)."""
    import torch

    if int(os.getenv("RANK", "0")) != 0:
        return None
    world = int(os.getenv("WORLD_SIZE", "1"))
    samples_per_step = args.get("per_device_train_batch_size", 1) * args.get("gradient_accumulation_steps", 1) * world
    steps = timer.step_times[ns.warmup_steps :]
    toks = timer.tokens[ns.warmup_steps :]
    params = count_params(args["model_name_or_path"])
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    peak = next((v for k, v in DENSE_BF16_PEAK_TFLOPS.items() if k in device), None)
    # tokens include image placeholder tokens; each merged image token stands for 4 vision patches
    # with mire_label_logits_only the output layer runs at the few label positions only: its FLOPs are left out
    # (conservatively, at every token), so that MFU counts work done, not work skipped
    label_only = bool(label_logits and label_logits.enabled)
    llm_flops = 6 * (params["llm_params"] - (params["output_layer_params"] if label_only else 0)) * sum(toks)
    total_time = sum(steps)
    per_step_sps = [samples_per_step / s for s in steps]
    result = {
        "label": ns.label,
        "config": ns.config,
        "overrides": ns.overrides,
        "device": device,
        "world_size": world,
        "steps_timed": len(steps),
        "warmup_steps": ns.warmup_steps,
        "samples_per_step": samples_per_step,  # packed runs: packed sequences, several records each
        # packed runs: "real", the non-padding tokens of the packs (until 2026-12-04 "all": the padding counted too)
        "tokens_counted": "real" if timer.packed is not None else args["include_num_input_tokens_seen"],
        "samples_per_s": {"min": min(per_step_sps), "median": statistics.median(per_step_sps), "max": max(per_step_sps),
                          "mean": samples_per_step * len(steps) / total_time},
        "tokens_per_s": sum(toks) / total_time,
        "tokens_per_sample": sum(toks) / (samples_per_step * len(steps)),
        # records a second: packed runs count the records in their packs, the others are one record a sample
        "records_per_s": (sum(timer.records[ns.warmup_steps:]) if timer.packed is not None
                          else samples_per_step * len(steps)) / total_time,
        "step_time_s": {"min": min(steps), "median": statistics.median(steps), "max": max(steps)},
        "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        # CPU offload: optimizer states, fp32 grads and pinned buffers live in this process's host memory
        "peak_host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "peak_gpu_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None,
        "params": params,
        "optimizer": report.line,
        "mfu": (llm_flops / total_time / world) / (peak * 1e12) if peak else None,
        "right_pad_causal": bool(right_pad and right_pad.enabled),  # mire_factory/attention.py
        "packed_varlen": bool(right_pad and right_pad.enabled and right_pad.packed),
        "label_logits_only": label_only,  # mire_factory/label_logits.py
        # mire_checkpoint_layers: K of the language model's layers recompute in backward (None: LLaMA-Factory's own)
        "checkpoint_layers": checkpointing.line if checkpointing is not None else None,
        # mire_trim_padding (pack_padding.py): token positions of the training forwards as given and as run
        "trimmed_positions": dict(trim.counts) if trim is not None else None,
        # mire_master_weights (master_weights.py): bf16 weights in the model, fp32 masters in the optimizer
        "master_weights": masters.line if masters is not None else None,
        # mire_liger_layers (liger_layers.py): Liger's norm, MLP and rotary kernels, the model's own loss
        "liger_layers": liger.line if liger is not None else None,
        # mire_fp32_embedding_states (embedding_states.py): fp32 Adam states for the embeddings
        "embedding_states": embedding_states.line if embedding_states is not None else None,
        # every timed step as [seconds, real tokens]: whether slow steps are long packs or stalls
        "steps": [[round(t, 4), n] for t, n in zip(steps, toks, strict=True)],
        # the allocator's retries over the run (a cudaMalloc that failed, the cache freed and the call repeated: a
        # stall near the memory limit)
        "alloc_retries": torch.cuda.memory_stats().get("num_alloc_retries") if torch.cuda.is_available() else None,
        # the allocator's settings (expandable_segments changes how far reserved memory runs above the peak)
        "cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "wall_s": wall,  # from run_exp's start to the end of training (until 2026-12-03: to the end of the save)
    }
    if profiler is not None and profiler.summary is not None:
        result["profiled_step"] = {k: v for k, v in profiler.summary.items() if k != "table"}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--warmup_steps", type=int, default=3)
    parser.add_argument("--label", default="")
    parser.add_argument("--profile", action="store_true",
                        help="profile the last warm-up step: OUT's .profile.txt (kernels by GPU time), busy fraction")
    parser.add_argument("--skip_save", action="store_true",
                        help="exit once the figures are written, without LLaMA-Factory's final save of the model (a "
                             "7B fp32 save is 30 GB and about a minute of a lease)")
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    ns = parser.parse_args(argv)
    if ns.profile and ns.warmup_steps < 1:
        raise MireInputError(problem(ns.config, None, "--profile", "needs --warmup_steps >= 1 (it profiles the last "
                                                                    "warm-up step, which the figures leave out)"))
    args = read_config(ns.config, ns.overrides)
    # Packed runs (neat_packing) hand the model a 4D float mask, whose sum the Trainer's "non_padding" count takes
    # for a token count (about -1e18 on the CPU): StepTimer counts their real tokens and records off that mask.
    # (packing without neat_packing gives a 2D mask of ones, padding included: counted as unpacked sequences)
    packed = bool(args.get("neat_packing"))
    args["include_num_input_tokens_seen"] = "no" if packed else "non_padding"
    # timed as mire_factory.train trains: the cuDNN SDPA backend off (NaN gradients on Hopper) unless the
    # overrides say mire_cudnn_sdp=true; the figures in results/ before 2026-12-02's second lease ran with it on
    set_cudnn_sdp(own_flag(args, "mire_cudnn_sdp", False, ns.config))
    flags = [own_flag(args, key, False, ns.config) for key in ("mire_right_pad_causal", "mire_packed_varlen")]
    right_pad = attention.callback(packed=flags[1]) if any(flags) else None
    trim = pack_padding.callback() if own_flag(args, "mire_trim_padding", flags[1], ns.config) else None
    label_logits = label_logits_module.callback() if own_flag(args, "mire_label_logits_only", False, ns.config) else None
    checkpoint_k = checkpoint_layers.read_key(args, ns.config)
    checkpointing = checkpoint_layers.callback(checkpoint_k, ns.config) if checkpoint_k is not None else None
    embedding_states = None  # its callback before master weights', which replace the weights it looks up
    if own_flag(args, embedding_states_module.KEY, False, ns.config):
        embedding_states_module.check(args, ns.config)
        embedding_states = embedding_states_module.callback(ns.config)
    masters = None
    if own_flag(args, master_weights.KEY, False, ns.config):
        master_weights.check(args, ns.config)
        masters = master_weights.callback(ns.config)
    liger = fp8 = None
    if own_flag(args, liger_layers.KEY, False, ns.config):
        liger_layers.check(args, ns.config)
        liger = liger_layers.callback(ns.config)
    if own_flag(args, fp8_adam_states.KEY, False, ns.config):
        fp8_adam_states.check(args, ns.config)
        fp8 = fp8_adam_states.callback(ns.config)
    timer = StepTimer(packed=packed)
    report = OptimizerReport()  # which optimizer, state types and parameter dtypes were measured

    from llamafactory.train.tuner import run_exp

    profiler = StepProfiler(max(ns.warmup_steps - 1, 0)) if ns.profile else None
    profile_out = str(Path(ns.out).with_suffix(".profile.txt"))
    with OutputSet() as outs:
        outs.path(ns.out)  # an unwritable --out fails now, not after the training

        def write(result: dict | None) -> None:
            if result is not None:
                outs.write_json(ns.out, result)
                if profiler is not None and profiler.summary is not None:
                    s = profiler.summary
                    outs.write_text(profile_out, f"step {s['step']}: {s['wall_s']:.3f} s wall, GPU busy "
                                    f"{s['gpu_busy_s']:.3f} s\n{s['table']}\n")
                outs.commit()
                print("BENCH", json.dumps(result))

        start = time.perf_counter()
        writer = ResultWriter(lambda: write(bench_result(ns, args, timer, report, time.perf_counter() - start,
                                                         profiler, right_pad, label_logits, checkpointing, trim,
                                                         masters, liger, embedding_states)),
                              skip_save=ns.skip_save)
        callbacks = [timer, report, writer] + [c for c in (profiler, right_pad, label_logits, checkpointing, trim,
                                                            embedding_states, masters, liger, fp8) if c is not None]
        run_exp(args=args, callbacks=callbacks)
        if not writer.written:  # a trainer that never reached on_train_end: no figures to report
            print(f"error: training ended without a result for {ns.out}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    run_cli(main)
