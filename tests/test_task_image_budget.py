"""Per-task image budgets: tools.convert --scene_image_max_pixels / --dialogue_image_max_pixels shrink each task's
images at conversion (mire_factory/image_copies.py), in every split alike, as LLaMA-Factory's own image_max_pixels
would; recipe_sizing measures under them."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SAMPLE_DIR, call_main, call_tool, convert_ok
from mire_factory.dataset_info import TASK_MAX_PIXELS_KEY
from mire_factory.image_copies import DERIVED_DIR, capped_size, qwen2_vl_tokens
from mire_factory.io import read_json
from mire_factory.synthetic import make_records, write_dataset

SCENE_CAP, DIALOGUE_CAP = 400_000, 100_000  # the synthetic images are 700x500 = 350,000 pixels


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    train = make_records(6, 6, root / "images", seed=8, image_size=(700, 500), max_dialogue_images=2,
                         image_classes=("商品头图", "退款页面"), dialogue_classes=("是否好用", "气泡"))
    assert sum(len(r["image"]) for r in train if "多轮对话" in r["instruction"]) >= 2
    write_dataset(root / "train.json", train)
    # the test file holds the same pictures under other ids: each must look as its train copy does
    write_dataset(root / "test.json", [{**r, "id": "t-" + r["id"], "output": ""} for r in train])
    return root


CAPS = ["--scene_image_max_pixels", str(SCENE_CAP), "--dialogue_image_max_pixels", str(DIALOGUE_CAP)]


def test_caps_shrink_each_tasks_images_alike_in_every_split(data, tmp_path):
    out = tmp_path / "out"
    source = {"--image_dir": data / "images", "--output_dir": out}
    flat = [str(x) for kv in source.items() for x in kv]
    proc = convert_ok("--input_file", data / "train.json", *flat, *CAPS, "--val_size", "0.25", "--augment", "1")
    assert f"--dialogue_image_max_pixels {DIALOGUE_CAP}: " in proc.stdout
    convert_ok("--input_file", data / "test.json", *flat, *CAPS)
    info = read_json(out / "dataset_info.json")
    for name in ("mire_train", "mire_val", "mire_test"):
        assert info[name][TASK_MAX_PIXELS_KEY] == {"image": SCENE_CAP, "dialogue": DIALOGUE_CAP}

    by_source: dict[str, set[str]] = {}  # source image name -> the paths every split's original rows point at
    dialogue_images = 0
    for split in ("train", "val", "test"):
        for row in read_json(out / f"mire_{split}.json"):
            dialogue = "多轮对话" in row["messages"][0]["content"]
            for path in row["images"]:
                with Image.open(out / path) as image:
                    size = image.size
                if "#aug" in row["id"]:  # an augmented copy: the cap first, then its transforms
                    if dialogue:
                        assert f"-max{DIALOGUE_CAP}-" in path
                    continue
                if dialogue:  # over its cap: a derived copy of LLaMA-Factory's size at that cap
                    dialogue_images += 1
                    assert path.startswith(DERIVED_DIR + "/") and path.endswith(f"-max{DIALOGUE_CAP}.png")
                    assert size == capped_size(700, 500, DIALOGUE_CAP) and size[0] * size[1] <= DIALOGUE_CAP
                    with Image.open(out / path) as image:
                        assert image.getbbox() is not None  # a picture, not an empty canvas
                else:  # the scene cap is above these images: the source itself, no copy
                    assert DERIVED_DIR not in path and size == (700, 500)
                name = Path(path).name
                by_source.setdefault(name, set()).add(path)
    assert dialogue_images >= 4
    # a test record's image is the very file its train copy uses: same size, same pixels at inference
    test_paths = {p for r in read_json(out / "mire_test.json") for p in r["images"]}
    train_paths = {p for s in ("train", "val") for r in read_json(out / f"mire_{s}.json") if "#aug" not in r["id"]
                   for p in r["images"]}
    assert test_paths == train_paths

    # a split converted without the caps beside splits with them: warned
    proc = convert_ok("--input_file", data / "test.json", *flat)
    assert "per-task pixel caps" in proc.stderr and "mire_train" in proc.stderr
    assert TASK_MAX_PIXELS_KEY not in read_json(out / "dataset_info.json")["mire_test"]


def _variants(tmp_path) -> list[Path]:
    """Images of the modes a source comes in: RGB JPEG, palette and RGBA PNG, grayscale."""
    base = Image.effect_mandelbrot((900, 700), (-2, -1.2, 1, 1.2), 60).convert("RGB")
    out = []
    for mode, fmt in (("RGB", "JPEG"), ("P", "PNG"), ("RGBA", "PNG"), ("L", "PNG")):
        path = tmp_path / f"src-{mode}.{fmt.lower()}"
        base.convert(mode).save(path, format=fmt)
        out.append(path)
    return out


def test_a_capped_copy_is_what_llamafactory_makes_of_its_source_at_that_cap(tmp_path):
    """Training on the derived copy at the recipe's image_max_pixels gives the pixels LLaMA-Factory itself gives
    the source at image_max_pixels = the cap: the cap is a per-task image_max_pixels, nothing else. Real
    screenshots too, when ../shared/mire_sample is there."""
    from llamafactory.data.mm_plugin import get_mm_plugin

    from mire_factory.image_copies import ImageCopy, Op, write_copies
    from mire_factory.io import OutputSet

    plugin = get_mm_plugin("qwen2_vl", image_token="<|image_pad|>")
    real = sorted((SAMPLE_DIR / "images").iterdir())[:4] if (SAMPLE_DIR / "images").is_dir() else []
    sources = _variants(tmp_path) + real
    cap = 175_616
    with OutputSet() as outs:
        report = write_copies([ImageCopy(p, (Op("max_pixels", cap),)) for p in sources], tmp_path / "out", outs)
    assert report.written == len(sources)
    for src in sources:
        derived = report.paths[ImageCopy(src, (Op("max_pixels", cap),))]
        (want,) = plugin._regularize_images([str(src)], image_max_pixels=cap, image_min_pixels=32 * 32)["images"]
        (got,) = plugin._regularize_images([str(derived)], image_max_pixels=589_824,
                                           image_min_pixels=32 * 32)["images"]
        assert got.size == want.size and want.size[0] * want.size[1] <= cap, src
        assert np.array_equal(np.asarray(got), np.asarray(want)), src


@pytest.mark.parametrize("flag,value", [("--dialogue_image_max_pixels", "-5"), ("--scene_image_max_pixels", "100")])
def test_a_bad_cap_is_one_line_and_writes_nothing(data, tmp_path, flag, value):
    out = tmp_path / "out"
    proc = call_tool("convert", "--input_file", data / "train.json", "--image_dir", data / "images", "--output_dir",
                     out, flag, value)
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(errors) == 1 and flag in errors[0] and value in errors[0], proc.stderr
    assert not out.exists()


def test_sizing_under_the_caps_is_what_training_renders_from_the_converted_files(data, tmp_path):
    from mire_factory import recipe_sizing
    from mire_factory.records import load_records
    from mire_factory.sharegpt import read_sharegpt

    out = tmp_path / "out"
    convert_ok("--input_file", data / "test.json", "--image_dir", data / "images", "--output_dir", out, *CAPS)
    records = load_records(data / "test.json", data / "images")
    caps = {"image": SCENE_CAP, "dialogue": DIALOGUE_CAP}
    sized = recipe_sizing.measure(records, data / "images", 589_824, task_max_pixels=caps)
    converted = recipe_sizing.measure(read_sharegpt("mire_test", out), "/", 589_824)
    uncapped = recipe_sizing.measure(records, data / "images", 589_824)
    assert [(x.id, x.image_tokens, x.total_tokens) for x in sized] == \
        [(x.id, x.image_tokens, x.total_tokens) for x in converted]
    per_image = qwen2_vl_tokens(capped_size(700, 500, DIALOGUE_CAP))
    for capped, full in zip(sized, uncapped, strict=True):
        if capped.task == "dialogue":
            assert capped.image_tokens == per_image * capped.n_images
            assert full.image_tokens > capped.image_tokens or capped.n_images == 0
        else:
            assert capped.image_tokens == full.image_tokens  # under its cap: unchanged

    proc = call_main(recipe_sizing.main, "--input_file", data / "train.json", "--image_dir", data / "images",
                     "--image_max_pixels", "589824", *CAPS)
    rows = [line.split(" | ") for line in proc.stdout.splitlines()[1:]]
    assert proc.returncode == 0 and {(r[1], r[2]) for r in rows} == {
        ("-", "image"), ("-", "dialogue"), (str(SCENE_CAP), "image"), (str(DIALOGUE_CAP), "dialogue")}
    assert {r[5] for r in rows if r[1:3] == [str(DIALOGUE_CAP), "dialogue"]} == {str(per_image)}


def test_inference_refuses_a_test_set_with_other_caps_than_training(data, tmp_path):
    """A model trained on capped images, asked a test file converted without the caps (or the reverse): exit 2 with
    the convert command that fixes it; with the same caps it goes on."""
    import yaml

    from conftest import REPO

    out, model = tmp_path / "data", tmp_path / "saves"
    flat = ["--image_dir", data / "images", "--output_dir", out]
    convert_ok("--input_file", data / "train.json", *flat, *CAPS, "--val_size", "0")
    convert_ok("--input_file", data / "test.json", *flat)  # without the caps: warned, and refused at inference
    model.mkdir()
    recipe = yaml.safe_load((REPO / "configs" / "qwen2_vl_full_sft.yaml").read_text(encoding="utf-8"))
    recipe.update(dataset="mire_train", dataset_dir=str(out))
    (model / "training_args.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    save = tmp_path / "p.jsonl"
    proc = call_tool("vllm_infer", "--model_name_or_path", model, "--dataset", "mire_test", "--save_name", save)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stdout + proc.stderr
    assert "converted with per-task pixel caps none" in errors[0]
    assert f"--scene_image_max_pixels {SCENE_CAP} --dialogue_image_max_pixels {DIALOGUE_CAP}" in errors[0]
    assert not save.exists()

    from mire_factory.hparams import parse_args
    from mire_factory.infer.args import InferArgs, config_values
    from mire_factory.infer.pipeline import check_dataset_caps

    convert_ok("--input_file", data / "test.json", *flat, *CAPS)
    args = parse_args(InferArgs, ["--model_name_or_path", str(model), "--dataset", "mire_test"], None,
                      config_values=config_values)
    assert args.task_image_max_pixels == f"image={SCENE_CAP},dialogue={DIALOGUE_CAP}"
    assert check_dataset_caps(args) == args.task_image_max_pixels  # the same caps: no refusal

    # the caps are part of the predictions' origin (a resume from images of other sizes is refused), when set
    from mire_factory.infer.origin import make_origin
    from mire_factory.prompt_variants import get_prompt_variant

    plain = get_prompt_variant("plain")
    assert make_origin(args, plain, args.task_image_max_pixels)["origin"]["task_image_max_pixels"] == \
        f"image={SCENE_CAP},dialogue={DIALOGUE_CAP}"
    assert "task_image_max_pixels" not in make_origin(args, plain)["origin"]
