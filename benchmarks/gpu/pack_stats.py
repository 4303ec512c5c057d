"""How LLaMA-Factory's neat_packing fills its packs: records and real (non-padding) tokens a pack, for a recipe and
its overrides, through LLaMA-Factory's own preprocessing (no model weights are read: any checkpoint directory with the
same processor gives the same packs). Packing runs per preprocessing worker's shard, each shard ending in a
partly filled pack: give the run's preprocessing_num_workers. A pack is padded to cutoff_len, so a packed run's samples/s (packs/s) turns
into records/s and real tokens/s with these figures.

    python benchmarks/gpu/pack_stats.py configs/qwen2_vl_7b_1gpu_full_sft.yaml model_name_or_path=DIR \
        dataset_dir=.gpu_data/mire neat_packing=true --out pack_stats.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mire_factory.io import MireInputError, problem, run_cli, write_json_atomic  # noqa: E402
from mire_factory.train import read_config  # noqa: E402


def pack_figures(config: str, args: dict) -> dict:
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    # preprocessing only: no precision or DeepSpeed setting matters, and the CPU refuses bf16
    args = {**args, "output_dir": args.get("output_dir", "/tmp/pack_stats"), "report_to": "none",
            "eval_dataset": None, "val_size": 0.0, "eval_strategy": "no", "bf16": False, "pure_bf16": False,
            "deepspeed": None}
    # LLaMA-Factory logs and prints an example record to stdout: keep stdout the figures'
    with contextlib.redirect_stdout(sys.stderr):
        try:
            model_args, data_args, training_args, _, _ = get_train_args(args)
            tokenizer_module = load_tokenizer(model_args)
            template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
            dataset = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)
        except ValueError as exc:  # LLaMA-Factory's checks of its arguments and datasets
            raise MireInputError(problem(config, None, None, str(exc).splitlines()[0])) from None
    packs = dataset["train_dataset"]
    # neat_packing's attention mask numbers each token's record from 1 (0: padding)
    records = [max(mask) for mask in packs["attention_mask"]]
    real = [sum(1 for index in mask if index) for mask in packs["attention_mask"]]
    length = len(packs["attention_mask"][0])

    def spread(values):
        return {"min": min(values), "median": statistics.median(values), "max": max(values),
                "mean": statistics.fmean(values), "stdev": statistics.pstdev(values)}

    return {"dataset": ",".join(data_args.dataset), "packs": len(records), "pack_length": length, "records": sum(records), "real_tokens": sum(real),
            "records_per_pack": spread(records), "real_tokens_per_pack": spread(real),
            "fill": sum(real) / (length * len(records)), "tokens_per_record": sum(real) / sum(records),
            "cutoff_len": data_args.cutoff_len}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="a JSON file for the figures (printed either way)")
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    ns = parser.parse_args(argv)
    figures = pack_figures(ns.config, read_config(ns.config, ns.overrides))
    print(json.dumps(figures, indent=1))
    if ns.out:
        write_json_atomic(ns.out, figures)


if __name__ == "__main__":
    run_cli(main)
