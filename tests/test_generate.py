"""Teachers asked about images: tools.extract_info --backend teacher and tools.generate (any images + your prompts),
against the fault-injecting server (tests/fault_server.py) and the real `llamafactory-cli api`; the export read back
through LLaMA-Factory's own dataset pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fault_server import RunningServer
from PIL import Image
from qwen_vl_utils.vision_process import smart_resize

from conftest import call_tool, run_tool
from mire_factory.synthetic import make_records, write_dataset

SECRET = "sk-test-0123456789abcdef"
FAST = ["--timeout", "2", "--no_progress", "--max_pixels", "50176"]
PROMPT = "请用一句话描述这张图片的内容。"
SYSTEM = "你是电商客服助手。"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, Path]:
    """(MIRE json, image folder): 5 image-scene records, 2 dialogues with images, of several sizes."""
    root = tmp_path_factory.mktemp("gen_data")
    write_dataset(root / "train.json", make_records(5, 2, root / "images", seed=11, image_size=(280, 560)))
    for k, path in enumerate(sorted((root / "images").iterdir())):
        with Image.open(path) as img:
            img.resize((224 + 56 * (k % 3), 448)).save(path)
    return root / "train.json", root / "images"


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("prompts")
    (root / "ask.txt").write_text(PROMPT + "\n", encoding="utf-8")
    (root / "system.txt").write_text(SYSTEM, encoding="utf-8")
    return root / "ask.txt", root / "system.txt"


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_extract_info_teacher_under_faults_never_writes_the_key(images, tmp_path):
    mire, image_dir = images
    out = tmp_path / "info.jsonl"
    env = {"OPENAI_API_KEY": SECRET, "FAULT_SERVER_API_KEY": SECRET}
    args = ["--input_file", mire, "--image_dir", image_dir, "--backend", "teacher", "--model", "vlm",
            "--output_file", out, "--max_retries", "8", *FAST]
    with RunningServer("--fault_rate", "0.4", "--faults", "429,500,reset,malformed,odd_choices", "--echo_key",
                       env=env) as server:
        proc = run_tool("extract_info", *args, "--base_url", server.url, env=env)
        stats = server.stats()
        again = run_tool("extract_info", *args, "--base_url", server.url, env=env)
    assert proc.returncode == 0, proc.stderr
    assert sum(v for k, v in stats.items() if k.startswith("fault_")) > 0  # faults were served and retried
    rows = rows_of(out)
    names = sorted({n for r in json.loads(mire.read_text(encoding="utf-8")) for n in r["image"]})
    assert sorted(r["image"] for r in rows) == names
    for r in rows:
        assert r["status"] == "ok" and r["backend"] == "teacher" and r["model"] == "vlm" and len(r["prompt_sha256"]) == 64
        assert r["text"] == "\n".join(r["info"]["可见文字"]) and r["text"].startswith("订单编号")
        assert set(r["info"]) == {"页面类型", "类型线索", "可见文字"} and r["usage"]["prompt_tokens"] > 0
        assert "***" in r["info"]["页面类型"] and "***" in r["raw"]  # the server echoed the key; it was removed
    assert SECRET not in out.read_text(encoding="utf-8") + proc.stdout + proc.stderr
    assert again.returncode == 0 and again.stdout.startswith("0 images") and rows_of(out) == rows


def test_dry_run_shows_the_system_prompt_then_the_image_then_the_prompt(images, prompts):
    _, image_dir = images
    proc = run_tool("generate", "--image_dir", image_dir, "--prompt_file", prompts[0], "--system_prompt_file",
                    prompts[1], "--model", "vlm", "--dry_run")
    assert proc.returncode == 0, proc.stderr
    request = json.loads(proc.stdout)
    system, user = request["messages"]
    assert system == {"role": "system", "content": SYSTEM}
    assert [p["type"] for p in user["content"]] == ["image_url", "text"] and user["content"][1]["text"] == PROMPT
    assert "base64 characters elided" in user["content"][0]["image_url"]["url"]


def test_generate_exports_sharegpt_for_llamafactory_and_swift(images, prompts, tiny_model_dir, tmp_path):
    from test_lf_dataset import IMAGE_PAD, expected_image_tokens, image_runs, lf_datasets
    from transformers import AutoProcessor

    _, image_dir = images
    out, export = tmp_path / "replies.jsonl", tmp_path / "export"
    args = ["--image_dir", image_dir, "--prompt_file", prompts[0], "--system_prompt_file", prompts[1], "--model", "vlm",
            "--output_file", out, "--export_dir", export, "--dataset_name", "gen", *FAST]
    with RunningServer("--fault_rate", "0.2", "--faults", "429,500") as server:
        proc = run_tool("generate", *args, "--base_url", server.url)
        swift = run_tool("generate", *args, "--base_url", server.url, "--export_format", "swift")
    assert proc.returncode == 0, proc.stderr
    replies = rows_of(out)
    files = sorted(p.name for p in image_dir.iterdir())
    assert sorted(r["image"] for r in replies) == files and all(r["status"] == "ok" for r in replies)
    assert f"exported {len(files)} answered images of {len(files)}" in proc.stdout
    info = json.loads((export / "dataset_info.json").read_text(encoding="utf-8"))
    assert info["gen"]["file_name"] == "gen.json" and info["gen"]["formatting"] == "sharegpt"
    assert info["gen"]["tags"]["system_tag"] == "system" and "mire_prompt_variant" not in info["gen"]
    data = json.loads((export / "gen.json").read_text(encoding="utf-8"))
    by_image = {r["image"]: r for r in replies}
    for row in data:
        (path,) = row["images"]
        assert not Path(path).is_absolute() and (export / path).resolve() == (image_dir / row["id"]).resolve()
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
        assert row["messages"][0]["content"] == SYSTEM and row["messages"][1]["content"] == "<image>" + PROMPT
        assert row["messages"][2]["content"] == by_image[row["id"]]["raw"].strip() != ""
    # the rerun asked nothing and wrote ms-swift's form, absolute paths
    assert swift.returncode == 0 and swift.stdout.startswith("0 images"), swift.stderr
    swift_rows = rows_of(export / "gen.jsonl")
    assert [r["messages"] for r in swift_rows] == [r["messages"] for r in data]
    assert all(Path(r["images"][0]).is_absolute() and Path(r["images"][0]).is_file() for r in swift_rows)
    # LLaMA-Factory's own loader: every sample kept, the system prompt, the image tokens, the reply as the label
    module, tokenizer = lf_datasets(tiny_model_dir, export, tmp_path / "run", do_train=True, dataset="gen")
    processor = AutoProcessor.from_pretrained(str(tiny_model_dir)).image_processor
    dataset = module["train_dataset"]
    assert len(dataset) == len(data)
    for sample, row in zip(dataset, data, strict=True):
        ids = sample["input_ids"]
        assert image_runs(ids) == [expected_image_tokens(export / row["images"][0], processor)]
        text = tokenizer.decode([t for t in ids if t != IMAGE_PAD])
        assert text.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n<|vision_start|>")
        assert f"<|vision_end|>{PROMPT}<|im_end|>\n<|im_start|>assistant\n" in text
        label = tokenizer.decode([t for t in sample["labels"] if t != -100])
        assert label == row["messages"][2]["content"] + "<|im_end|>\n"


def test_generate_refuses_bad_prompts_names_and_another_prompts_file(images, prompts, tmp_path):
    """tools.generate in this process (call_tool): six runs."""
    _, image_dir = images
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    other = tmp_path / "other.txt"
    other.write_text("另一个问题", encoding="utf-8")
    out = tmp_path / "replies.jsonl"
    base = ["--image_dir", image_dir, "--model", "vlm", "--output_file", out, *FAST]
    with RunningServer() as server:
        base += ["--base_url", server.url]
        cases = [
            (["--prompt_file", empty], "the prompt is empty"),
            (["--prompt_file", tmp_path / "missing.txt"], "file not found"),
            (["--prompt_file", prompts[0], "--export_dir", tmp_path / "e", "--dataset_name", "../up"],
             "is not a dataset name"),
            (["--prompt_file", prompts[0], "--system_prompt_file", image_dir], "is a directory"),
        ]
        for args, why in cases:
            proc = call_tool("generate", *base, *args)
            assert proc.returncode == 2 and why in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
            assert not out.exists() and not (tmp_path / "e").exists()
        first = call_tool("generate", *base, "--prompt_file", prompts[0], "--limit", "2")
        before = out.read_bytes()
        second = call_tool("generate", *base, "--prompt_file", other)
    assert first.returncode == 0, first.stderr
    assert second.returncode == 2 and "one info file holds one origin" in second.stderr
    assert out.read_bytes() == before


@pytest.mark.slow
def test_generate_and_extract_info_against_llamafactory_api(images, prompts, lf_api_server, tmp_path):
    """The real server with the tiny random model: every image reaches it (the prompt grows by exactly its image
    tokens), the system prompt too. Random replies (blank lines, mostly) rarely stop before --max_tokens: blank or cut
    replies are failures."""
    _, image_dir = images
    runs = {}
    for name, extra in (("plain", []), ("system", ["--system_prompt_file", prompts[1]])):
        out = tmp_path / f"{name}.jsonl"
        proc = run_tool("generate", "--image_dir", image_dir, "--prompt_file", prompts[0], *extra, "--base_url",
                        lf_api_server, "--model", "tiny", "--output_file", out, "--max_tokens", "4",
                        "--concurrency", "2", "--timeout", "300", "--max_pixels", "50176", "--no_progress")
        rows = rows_of(out)
        failed = [r for r in rows if r["status"] == "failed"]
        assert proc.returncode == (3 if failed else 0), proc.stderr
        assert all(r["error"] in ("empty reply", "the reply was cut at max_tokens (raise --max_tokens)")
                   for r in failed)
        runs[name] = {r["image"]: r for r in rows}
    sizes = set()
    for image, row in runs["plain"].items():
        with Image.open(image_dir / image) as img:
            h, w = smart_resize(img.height, img.width, factor=28, min_pixels=3136, max_pixels=50176)
        sizes.add((h // 28) * (w // 28))
        row["text_tokens"] = row["usage"]["prompt_tokens"] - (h // 28) * (w // 28)
        assert row["usage"]["completion_tokens"] >= 1
    assert len(sizes) > 1 and len({r["text_tokens"] for r in runs["plain"].values()}) == 1
    # our system prompt took the place of the template's default one, for every image
    from mire_factory.tiny_model import load_qwen2_tokenizer

    tokenizer = load_qwen2_tokenizer()
    change = len(tokenizer.encode(SYSTEM)) - len(tokenizer.encode("You are a helpful assistant."))
    assert change != 0
    assert {runs["system"][k]["usage"]["prompt_tokens"] - runs["plain"][k]["usage"]["prompt_tokens"]
            for k in runs["plain"]} == {change}
    out = tmp_path / "info.jsonl"
    proc = run_tool("extract_info", "--image_dir", image_dir, "--backend", "teacher", "--base_url", lf_api_server,
                    "--model", "tiny", "--output_file", out, "--max_tokens", "4", "--limit", "2", "--timeout", "300",
                    "--max_pixels", "50176", "--no_progress")
    rows = rows_of(out)
    assert len(rows) == 2 and proc.returncode == (3 if any(r["status"] == "failed" for r in rows) else 0)
    assert all(r["raw"] is not None and r["usage"]["prompt_tokens"] > 0 for r in rows)
