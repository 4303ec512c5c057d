"""Generation runs at the positions training used: Qwen2-VL's image-grid (mrope) positions, in the hf backend of
tools.vllm_infer and in the F1 callback, equal those LLaMA-Factory's training collator gives the same tokens."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    from llamafactory.data.collator import SFTDataCollatorWith4DAttentionMask
    from PIL import Image

    from mire_factory.infer.hf_backend import GenItem, load_hf_model
    from mire_factory.infer.render import load_components, render_prompt_ids

    root = tmp_path_factory.mktemp("mrope")
    gen = torch.Generator().manual_seed(0)

    def image(name: str, width: int, height: int) -> str:
        pixels = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(root / name)
        return str(root / name)

    comp = load_components(str(tiny_model_dir), image_max_pixels=65536)
    model = load_hf_model(comp)
    # image grids of 4 x 6 and 2 x 2 tokens, text between and after them: positions differ from 0, 1, 2, ...
    prompts = [("<image>这是什么页面？", [image("wide.png", 168, 112)]),
               ("用户: <image>\n客服: 您好\n用户: <image>\n这个会生锈吗", [image("a.png", 56, 56), image("b.png", 168, 112)])]
    items = [GenItem(render_prompt_ids(comp, text, images), images, "image") for text, images in prompts]
    collator = SFTDataCollatorWith4DAttentionMask(template=comp.template, model=model, tokenizer=comp.tokenizer,
                                                  processor=comp.processor, label_pad_token_id=-100)
    return comp, model, items, collator


def training_positions(collator, rows: list[list[int]], images: list[list[str]]) -> list[torch.Tensor]:
    """LLaMA-Factory's collator on the token sequences as training batches them: (3, length) per row."""
    features = [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(ids), "images": imgs,
                 "videos": [], "audios": []} for ids, imgs in zip(rows, images, strict=True)]
    batch = collator(features)
    mask = batch["attention_mask"].bool()
    positions = batch["position_ids"][-3:]  # (time, height, width); a 4th row first, where there is one
    return [positions[:, k][:, mask[k]] for k in range(len(rows))]


def generation_positions(model, run) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The (3, batch, length) positions the language model gets at each forward of `run` (prefill, then decode)."""
    seen = []

    def hook(_module, _args, kwargs):
        positions = kwargs["position_ids"]
        seen.append(positions[-3:] if positions.dim() == 3 else positions.expand(3, *positions.shape))

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = run()
    finally:
        handle.remove()
    return seen, out


def assert_same_positions(collator, seen, mask, rows, new_tokens, images):
    """Row k: prefill positions of its unpadded tokens, then each decode step's, equal training's for the prompt
    followed by the generated tokens."""
    expected = training_positions(collator, [r + t for r, t in zip(rows, new_tokens, strict=True)], images)
    for k in range(len(rows)):
        got = torch.cat([seen[0][:, k][:, mask[k].bool()]] + [step[:, k] for step in seen[1:]], dim=1)
        n = got.shape[1]
        assert torch.equal(got.cpu(), expected[k][:, :n]), f"row {k}: {got.tolist()} != {expected[k][:, :n].tolist()}"


def test_hf_backend_generates_at_training_positions(setup):
    from mire_factory.infer.hf_backend import generate_prepared, prepare_batch
    from mire_factory.infer.render import expand_image_tokens

    comp, model, items, collator = setup
    batch = prepare_batch(comp, items)  # left-padded: the two prompts differ in length
    seen, _ = generation_positions(model, lambda: generate_prepared(model, comp, batch, 3, min_new_tokens=3))
    assert len(seen) == 3
    counts = [int(g.prod()) // comp.merge_length for g in batch.mm["image_grid_thw"]]
    rows, k = [], 0
    for item in items:
        rows.append(expand_image_tokens(item.prompt_ids, comp.image_pad_id, counts[k : k + len(item.images)]))
        k += len(item.images)
    pad = comp.tokenizer.pad_token_id
    new = [[pad] * 2] * len(rows)  # positions do not depend on which tokens were generated
    assert_same_positions(collator, seen, batch.attention_mask, rows, new, [item.images for item in items])


def test_f1_callback_generates_at_training_positions(setup):
    from mire_factory.f1_callback import F1Callback
    from mire_factory.infer.render import expand_image_tokens

    comp, model, items, collator = setup
    dataset, rows = [], []
    for item in items:
        mm = comp.template.mm_plugin._get_mm_inputs(item.images, [], [], comp.processor)
        counts = [int(g.prod()) // comp.merge_length for g in mm["image_grid_thw"]]
        prompt = expand_image_tokens(item.prompt_ids, comp.image_pad_id, counts)
        answer = comp.tokenizer.encode("商品头图", add_special_tokens=False) + [comp.stop_id]
        dataset.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer,
                        "images": item.images})
        rows.append(prompt)
    args = SimpleNamespace(per_device_eval_batch_size=2, bf16=False, fp16=False, device=torch.device("cpu"),
                           output_dir="unused")
    callback = F1Callback(max_new_tokens=3, save_predictions=False)
    seen, _ = generation_positions(model, lambda: callback.evaluate_f1(args, model, collator, dataset, "eval", True))
    # the callback batches longest first, left-padded
    order = sorted(range(len(rows)), key=lambda k: -len(rows[k]))
    width = seen[0].shape[-1]
    mask = torch.tensor([[0] * (width - len(rows[k])) + [1] * len(rows[k]) for k in order])
    steps = len(seen) - 1
    assert steps >= 1
    pad = comp.tokenizer.pad_token_id
    assert_same_positions(collator, seen, mask, [rows[k] for k in order], [[pad] * steps] * len(rows),
                          [items[k].images for k in order])
