"""How far `--compile`'s vision tower is from float32, next to the eager bf16 tower (CPU, Qwen2-VL-2B's vision
architecture with random weights, real screenshots).

python -m benchmarks.vision_numerics [--image_dir ../shared/mire_sample/images] [--n_images 3]
    [--image_max_pixels 200704]

Prints the mean relative and max absolute differences of the merged vision features: eager bf16 vs float32, the
varlen wiring with compiled blocks in bf16 vs float32, and the two bf16 towers against each other. On the GPU the
two bf16 towers differ by the same order (BENCHMARKS.md): rounding, not a different computation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image_dir", default=str(REPO.parent / "shared" / "mire_sample" / "images"))
    p.add_argument("--n_images", type=int, default=3)
    p.add_argument("--image_max_pixels", type=int, default=200704)
    args = p.parse_args()

    import tempfile

    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from mire_factory.infer.fast_vision import speed_up_vision_tower
    from mire_factory.infer.hf_backend import image_inputs
    from mire_factory.infer.render import load_components
    from mire_factory.tiny_model import PRESETS, build_config, make_tiny_model

    torch.manual_seed(0)
    config = build_config(PRESETS["2b"])
    config.text_config.num_hidden_layers = 1  # only the vision tower runs
    model = Qwen2VLForConditionalGeneration(config).eval()
    processor_dir = make_tiny_model(Path(tempfile.mkdtemp()) / "tiny")  # the real processor and tokenizer
    comp = load_components(str(processor_dir), image_max_pixels=args.image_max_pixels)
    images = sorted(str(path) for path in Path(args.image_dir).iterdir())[: args.n_images]
    mm = image_inputs(comp, images)

    def features(dtype):
        with torch.inference_mode():
            return model.model.visual(mm["pixel_values"].to(dtype), grid_thw=mm["image_grid_thw"]).pooler_output.float()

    reference = features(torch.float32)
    model.to(torch.bfloat16)
    eager = features(torch.bfloat16)
    speed_up_vision_tower(model, compile_blocks=True)
    compiled = features(torch.bfloat16)

    def diff(a, b):
        return {"mean_relative": ((a - b).abs().mean() / b.abs().mean()).item(), "max_abs": (a - b).abs().max().item()}

    print(json.dumps({"images": mm["image_grid_thw"].tolist(), "eager_bf16_vs_fp32": diff(eager, reference),
                      "compiled_bf16_vs_fp32": diff(compiled, reference),
                      "compiled_vs_eager_bf16": diff(compiled, eager)}, indent=2))


if __name__ == "__main__":
    main()
