"""Inference building blocks without a model: dataset reading, truncation planner, constraints, vLLM inputs,
shards and the resumable output file (tokenizer and processor of the tiny model only)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from mire_factory.io import MireInputError
from mire_factory.prompts import format_cot_answer
from mire_factory.records import load_records
from mire_factory.sharegpt import chat_row, sharegpt_entry
from mire_factory.taxonomy import DIALOGUE_FOOTER, DIALOGUE_HEADER, LABELS


def write_sharegpt(records, image_dir: Path, out: Path, name: str = "mire_test", with_labels: bool = True) -> Path:
    """MIRE records (their bare instructions: no prompt variant) through the ShareGPT writer, registered as `name`;
    images linked under out/images."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    # synthetic.make_records' dicts as well as MireRecords
    records = [SimpleNamespace(id=r["id"], instruction=r["instruction"], images=r["image"], output=r.get("output"))
               if isinstance(r, dict) else r for r in records]
    for img in {img for r in records for img in r.images}:
        os.symlink(Path(image_dir).resolve() / img, out / "images" / img)
    rows = [chat_row(r.instruction, (r.output or "") if with_labels else "", [f"images/{img}" for img in r.images],
                     row_id=r.id) for r in records]
    (out / "mire_test.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    (out / "dataset_info.json").write_text(json.dumps({name: sharegpt_entry("mire_test.json")}), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def sample_dataset(mire_sample, tmp_path_factory) -> Path:
    records = load_records(mire_sample / "train_sample.json", mire_sample / "images")
    return write_sharegpt(records, mire_sample / "images", tmp_path_factory.mktemp("sample_sharegpt"))


@pytest.fixture(scope="module")
def comp(tiny_model_dir):
    from mire_factory.infer.render import load_components

    return load_components(str(tiny_model_dir), image_max_pixels=65536)


def make_planner(comp, cutoff_len, max_images=None):
    from mire_factory.infer.render import render_prompt_ids
    from mire_factory.infer.truncation import ImageTokenizer, Planner

    return Planner(comp.tokenizer, ImageTokenizer.from_processor(comp.processor),
                   len(render_prompt_ids(comp, "", [])), cutoff_len, max_images)


def rendered_length(comp, plan) -> int:
    from mire_factory.infer.render import expand_image_tokens, render_prompt_ids

    mm = comp.template.mm_plugin._get_mm_inputs(plan.images, [], [], comp.processor) if plan.images else {}
    counts = [int(g.prod()) // comp.merge_length for g in mm.get("image_grid_thw", [])]
    assert counts == plan.image_tokens  # the header arithmetic agrees with the image processor
    ids = render_prompt_ids(comp, plan.content, plan.images)
    return len(expand_image_tokens(ids, comp.image_pad_id, counts))


def test_read_sharegpt_reads_registration_and_reports_bad_records(sample_dataset, tmp_path):
    from mire_factory.sharegpt import read_sharegpt

    records = read_sharegpt("mire_test", sample_dataset)
    assert len(records) == 24 and all(os.path.isfile(p) for r in records for p in r.images)
    assert {r.task for r in records} == {"image", "dialogue"}
    rows = json.loads((sample_dataset / "mire_test.json").read_text(encoding="utf-8"))
    rows[3]["images"] = rows[3]["images"][1:]
    bad = write_sharegpt([], sample_dataset, tmp_path)
    (bad / "mire_test.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    os.rmdir(bad / "images")
    os.symlink(sample_dataset / "images", bad / "images")
    with pytest.raises(MireInputError) as err:
        read_sharegpt("mire_test", bad)
    assert len(err.value.lines) == 1 and rows[3]["id"] in err.value.lines[0] and "'images'" in err.value.lines[0]
    with pytest.raises(MireInputError, match="not registered"):
        read_sharegpt("nope", bad)


def test_planner_counts_equal_rendered_prompts(comp, sample_dataset):
    from mire_factory.sharegpt import read_sharegpt

    records = read_sharegpt("mire_test", sample_dataset)
    plans = make_planner(comp, cutoff_len=100_000).plan_many(records)
    for record, plan in zip(records, plans, strict=True):
        assert plan.content == record.instruction and not plan.dropped_turns
        assert rendered_length(comp, plan) == plan.n_tokens, record.id


def test_truncation_keeps_header_last_user_turn_and_label_list(comp, sample_dataset):
    from mire_factory.infer.truncation import split_dialogue
    from mire_factory.sharegpt import read_sharegpt

    records = read_sharegpt("mire_test", sample_dataset)
    plans = make_planner(comp, cutoff_len=512).plan_many(records)
    truncated = 0
    for record, plan in zip(records, plans, strict=True):
        assert rendered_length(comp, plan) == plan.n_tokens <= 512, record.id
        if record.task != "dialogue":
            assert plan.content == record.instruction
            continue
        header, turns, _ = split_dialogue(record.instruction)
        last_user = max(k for k, t in enumerate(turns) if t.startswith("用户"))
        assert plan.content.startswith(DIALOGUE_HEADER) and plan.content.endswith(DIALOGUE_FOOTER)
        assert plan.content.endswith("".join(turns[last_user:]) + DIALOGUE_FOOTER)
        assert all(k < last_user for k in plan.dropped_turns)
        kept = [t for k, t in enumerate(turns) if k not in plan.dropped_turns]
        assert plan.content == header + "".join(kept) + DIALOGUE_FOOTER
        assert plan.content.count("<image>") == len(plan.images) == len(record.images) - len(plan.dropped_images)
        truncated += bool(plan.dropped_turns)
    assert truncated >= 5  # the multi-image dialogues of the sample do not fit 512 tokens at this image size


def test_image_limit_drops_earliest_images_first(comp, tmp_path):
    from mire_factory.records import MireRecord
    from mire_factory.synthetic import make_records
    from mire_factory.taxonomy import build_dialogue_instruction

    imgs = [make_records(1, 0, tmp_path, seed=s, id_prefix=f"i{s}")[0]["image"][0] for s in range(3)]
    turns = [("用户", "<image>"), ("客服", "好的"), ("用户", "看这个<image>"), ("客服", "嗯"), ("用户", "最后<image>怎么办")]
    record = MireRecord("x", build_dialogue_instruction(turns), [str(tmp_path / i) for i in imgs], "dialogue")
    plan = make_planner(comp, cutoff_len=100_000, max_images=1).plan_many([record])[0]
    assert plan.dropped_images == [0, 1] and plan.images == [record.images[2]]
    assert plan.dropped_turns == [0]  # an image-only turn goes whole; a turn with text keeps its text
    assert "用户: 看这个\n" in plan.content and "最后<image>怎么办" in plan.content
    assert rendered_length(comp, plan) == plan.n_tokens


def test_planning_is_batched_and_fast(comp, sample_dataset):
    import time

    from mire_factory.sharegpt import read_sharegpt

    records = read_sharegpt("mire_test", sample_dataset) * 50  # 1,200 records
    sizes = [[(1080, 2400)] * len(r.images) for r in records]
    start = time.perf_counter()
    plans = make_planner(comp, cutoff_len=1024).plan_many(records, sizes)
    assert len(plans) == 1200 and time.perf_counter() - start < 10  # benchmarks/bench_infer.py has the figure


def test_label_trie_and_prefix_fn(comp):
    import torch

    from mire_factory.infer.constrained import LabelTrie, label_sequences, make_prefix_allowed_tokens_fn

    seqs = label_sequences(comp.tokenizer, LABELS["dialogue"], comp.stop_id)
    trie = LabelTrie(seqs)
    for seq in seqs:
        for k in range(len(seq)):
            assert seq[k] in trie.allowed(seq[:k])
        assert trie.allowed(seq) == []
    assert set(trie.allowed([])) == {s[0] for s in seqs}
    fn = make_prefix_allowed_tokens_fn([trie], prompt_len=2, fallback_id=0)
    assert fn(0, torch.tensor([7, 7, *seqs[0][:1]])) == trie.allowed(seqs[0][:1])
    assert fn(0, torch.tensor([7, 7, *seqs[0]])) == [0]


@pytest.mark.parametrize("position", ["last", "first"])
def test_cot_grammar_and_regex_accept_exactly_the_answer_format(position):
    from mire_factory.infer.answer import answer_paths, guided_decoding
    from mire_factory.infer.constrained import Grammar

    grammar = Grammar(answer_paths("image", "cot", position))
    pattern = guided_decoding("image", "cot", position)["regex"]
    assert "\\ " not in pattern  # xgrammar (vLLM's engine) warns about an escaped space
    regex = re.compile(pattern)
    good = format_cot_answer("购物车列表", "购物车页面", position)
    assert grammar.is_complete(good.encode()) and regex.fullmatch(good)
    for k in range(len(good.encode())):
        assert grammar.locate(good.encode()[:k])  # every prefix is viable
    for bad in [format_cot_answer("x", "不是标签", position), good[:-1], good + " ", '{"理由": "a\nb", "所属类别": "退款页面"}']:
        assert not grammar.is_complete(bad.encode()) and not regex.fullmatch(bad)
    assert guided_decoding("dialogue", "label") == {"choice": list(LABELS["dialogue"])}


@pytest.mark.parametrize("task", ["image", "dialogue"])
def test_cot_regex_reason_leaves_room_for_the_label_even_byte_by_byte(task):
    """vLLM's regex cannot count tokens: the reason cap keeps every path within max_new_tokens even when the fixed
    text comes one token per byte (a random-weight model does that) and the reason one token per character."""
    from mire_factory.infer.answer import answer_paths, guided_decoding, reason_chars

    n = reason_chars(task, 100)
    regex = re.compile(guided_decoding(task, "cot", "last", 100)["regex"])
    assert n > 0 and regex.fullmatch(format_cot_answer("因" * n, LABELS[task][0])) \
        and not regex.fullmatch(format_cot_answer("因" * (n + 1), LABELS[task][0]))
    for path in answer_paths(task, "cot"):
        assert len((path.a + path.b).encode()) + n + 1 <= 100
    assert guided_decoding(task, "cot", "last", 100, max_reason_chars=60)["regex"].count("{0,60}") == 1


@pytest.mark.parametrize("position", ["last", "first"])
@pytest.mark.parametrize("task", ["image", "dialogue"])
def test_factored_cot_regex_is_the_same_language_with_one_free_run(task, position):
    """The regex vLLM gets writes the reason once and the labels as one alternation (xgrammar spent ~20x less on
    its masks: benchmarks/cot_regex_xgrammar.py); it must accept exactly what one alternative per label accepts."""
    from mire_factory.infer.answer import answer_paths, reason_chars
    from mire_factory.infer.constrained import answer_regex

    paths, n = answer_paths(task, "cot", position), reason_chars(task, 100, position)
    factored, per_label = (re.compile(answer_regex(paths, n, factor=f)) for f in (True, False))
    assert factored.pattern.count(f"{{0,{n}}}") == 1 and per_label.pattern.count(f"{{0,{n}}}") == len(LABELS[task])
    other = LABELS["dialogue" if task == "image" else "image"][0]
    samples = [format_cot_answer(reason, label, pos) for label in (*LABELS[task], other, "")
               for reason in ("", "因", "因" * n, "因" * (n + 1), 'a"b', "a\nb") for pos in ("last", "first")]
    # json.dumps escapes these; a decoder could write them raw
    samples += [format_cot_answer("a@b", label, pos).replace("@", raw) for label in LABELS[task]
                for raw in ("\t", "\r", "\n", "\x1f", '"', "\\") for pos in ("last", "first")]
    samples += [s[:-1] for s in samples] + [s + " " for s in samples]
    verdicts = [(bool(factored.fullmatch(s)), bool(per_label.fullmatch(s))) for s in samples]
    assert all(a == b for a, b in verdicts)
    assert sum(a for a, _ in verdicts) == 3 * len(LABELS[task])  # reasons of 0, 1 and n characters, every label


def test_cot_answers_hold_no_control_character_json_refuses(comp):
    """JSON strings hold no raw U+0000-U+001F: on the H200 11 of 623 constrained CoT answers had a tab in the reason
    and failed json.loads. Neither the regex (vLLM) nor the byte grammar (hf) may let one in."""
    import torch

    from mire_factory.infer.answer import answer_paths, reason_chars
    from mire_factory.infer.constrained import Grammar, GrammarLogitsProcessor, answer_regex, vocab_bytes

    paths = answer_paths("dialogue", "cot", "last")
    regex = re.compile(answer_regex(paths, reason_chars("dialogue", 100, "last")))
    raw = format_cot_answer("a@b", LABELS["dialogue"][0])  # json.dumps would escape a control character
    assert not any(regex.fullmatch(raw.replace("@", chr(c))) for c in range(0x20))
    assert regex.fullmatch(raw.replace("@", "\x7f 因"))
    vocab = vocab_bytes(comp.tokenizer)
    control = torch.tensor([bool(v) and any(b < 0x20 for b in v) for v in vocab] + [False] * (151936 - len(vocab)))
    assert int(control.sum()) > 1000
    max_new = 50
    for seed in range(4):
        proc = GrammarLogitsProcessor([Grammar(paths)], 0, comp.tokenizer, comp.stop_id, max_new)
        gen, generated = torch.Generator().manual_seed(seed), []
        for _ in range(max_new):
            scores = torch.randn(1, 151936, generator=gen) + 50.0 * control  # a model that loves tabs
            tok = int(proc(torch.tensor([generated], dtype=torch.long).reshape(1, -1), scores).argmax())
            if tok == comp.stop_id:
                break
            generated.append(tok)
        assert json.loads(comp.tokenizer.decode(generated))["所属类别"] in LABELS["dialogue"]


def test_grammar_processor_forces_a_label_before_the_token_limit(comp):
    import torch

    from mire_factory.infer.answer import answer_paths
    from mire_factory.infer.constrained import Grammar, GrammarLogitsProcessor

    grammar = Grammar(answer_paths("dialogue", "cot", "last"))
    max_new = 50
    proc = GrammarLogitsProcessor([grammar], 0, comp.tokenizer, comp.stop_id, max_new)
    generated = []
    gen = torch.Generator().manual_seed(0)
    for _ in range(max_new):
        input_ids = torch.tensor(generated, dtype=torch.long).reshape(1, len(generated))
        scores = proc(input_ids, torch.randn(1, 151936, generator=gen))
        tok = int(scores.argmax())
        if tok == comp.stop_id:
            break
        generated.append(tok)
    text = comp.tokenizer.decode(generated)
    answer = json.loads(text)
    assert answer["所属类别"] in LABELS["dialogue"] and len(generated) < max_new


def test_vllm_inputs_are_the_training_prompt(comp, sample_dataset):
    from mire_factory.infer.render import render_prompt_ids
    from mire_factory.infer.vllm_inputs import (
        engine_kwargs,
        image_uuids,
        prompt_input,
        regularized_images,
        sampling_kwargs,
    )
    from mire_factory.sharegpt import read_sharegpt

    records = read_sharegpt("mire_test", sample_dataset)
    plans = make_planner(comp, cutoff_len=512, max_images=2).plan_many(records)
    kwargs = engine_kwargs("m", plans, 512, 12, adapter="a", tensor_parallel_size=2, extra={"max_num_seqs": 64})
    assert kwargs["max_model_len"] == 512 + 12 and kwargs["limit_mm_per_prompt"]["image"] == 2
    assert kwargs["enable_lora"] and kwargs["tensor_parallel_size"] == 2 and kwargs["max_num_seqs"] == 64
    # several renderer threads: vLLM refuses its processor cache then
    assert kwargs["renderer_num_workers"] > 1 and kwargs["mm_processor_cache_gb"] == 0
    assert engine_kwargs("m", plans, 512, 12, renderer_workers=1)["mm_processor_cache_gb"] > 0
    plan = next(p for p in plans if len(p.images) == 2)
    ids = render_prompt_ids(comp, plan.content, plan.images)
    plugin = comp.template.mm_plugin
    images = regularized_images(plugin, plan.images, 65536, 1024)
    training = plugin._regularize_images(plan.images, image_max_pixels=65536, image_min_pixels=1024)["images"]
    assert [im.tobytes() for im in images] == [im.tobytes() for im in training]  # training's own pixels
    uuids = image_uuids(plan.images, 65536, 1024)
    req = prompt_input(ids, images, uuids)
    assert req["prompt_token_ids"].count(comp.image_pad_id) == 2 and len(req["multi_modal_data"]["image"]) == 2
    assert all(img.width * img.height <= 65536 for img in req["multi_modal_data"]["image"])
    assert req["multi_modal_uuids"]["image"] == uuids and len(set(uuids)) == 2
    assert image_uuids(plan.images, 589824, 1024) != uuids  # another resize is another image for vLLM's caches
    assert len(req["prompt_token_ids"]) + sum(plan.image_tokens) - 2 == plan.n_tokens
    assert prompt_input(ids[:3], []) == {"prompt_token_ids": ids[:3]}
    fields = sampling_kwargs("image", 12, [comp.stop_id], constrained=True)
    assert fields["temperature"] == 0.0 and fields["max_tokens"] == 12
    assert fields["structured_outputs"] == {"choice": list(LABELS["image"])} and "min_tokens" not in fields
    assert sampling_kwargs("image", 12, [1], constrained=False)["structured_outputs"] is None
    assert sampling_kwargs("dialogue", 16, [1], min_new_tokens=16)["min_tokens"] == 16
    cot = sampling_kwargs("dialogue", 100, [1], constrained=True, answer_format="cot", max_reason_chars=30)
    assert "{0,30}" in cot["structured_outputs"]["regex"]


def test_vllm_engine_args_flag_is_checked(tmp_path):
    from mire_factory.infer.pipeline import InferArgs, check_args, vllm_engine_args

    args = InferArgs("m", "mire_test", str(tmp_path), vllm_engine_args='{"max_num_seqs": 8}')
    check_args(args)
    assert vllm_engine_args(args) == {"max_num_seqs": 8}
    for bad in ("{not json", "[1, 2]"):
        with pytest.raises(MireInputError):
            check_args(InferArgs("m", "mire_test", str(tmp_path), vllm_engine_args=bad))
    with pytest.raises(MireInputError):
        check_args(InferArgs("m", "mire_test", str(tmp_path), vllm_renderer_workers=0))


def test_shards_cover_everything_once_and_merge_checks(tmp_path):
    from mire_factory.infer.shards import merge_shards, shard_path, shard_range

    for n in (0, 1, 7, 100):
        for k in (1, 3, 8):
            covered = [i for s in range(k) for i in shard_range(n, k, s)]
            assert covered == list(range(n))
    with pytest.raises(MireInputError):
        shard_range(10, 2, 2)
    save = tmp_path / "p.jsonl"
    shard_path(save, 0, 2).write_text('{"id": "a", "predict": "1"}\n')
    with pytest.raises(MireInputError) as err:
        merge_shards(save, 2, ["a", "b"])
    assert any("shard-1-of-2" in line for line in err.value.lines) and not save.exists()
    shard_path(save, 1, 2).write_text('{"id": "b", "predict": "2"}\n')
    assert merge_shards(save, 2, ["b", "a"]) == 2
    assert [json.loads(x)["id"] for x in save.read_text().splitlines()] == ["b", "a"]


def test_output_resume_drops_a_cut_off_last_line(tmp_path):
    from mire_factory.infer.output import PredictionsLog

    path = tmp_path / "out.jsonl"
    with PredictionsLog(path) as out:
        out.write([{"id": "a", "predict": "x"}, {"id": "b", "predict": "y"}])
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"id": "c", "pre')  # killed mid-write
    assert set(PredictionsLog(path).done()) == {"a", "b"} and path.read_text().endswith("}\n")
    assert not PredictionsLog(path).finalize(["b", "a", "c"])
    assert PredictionsLog(path).finalize(["b", "a"])
    assert [json.loads(x)["id"] for x in path.read_text().splitlines()] == ["b", "a"]


def test_batch_inputs_equal_the_plugins_on_every_preparation_path(comp, sample_dataset):
    """Threaded image chunks, and the split path that runs the image processor where the model runs (a GPU in
    production, the CPU here), build exactly the tensors of mm_plugin's `_get_mm_inputs` (the training path)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from mire_factory.infer.hf_backend import GenItem, finish_on_device, prepare_batch
    from mire_factory.infer.render import expand_image_tokens, render_prompt_ids
    from mire_factory.sharegpt import read_sharegpt

    records = read_sharegpt("mire_test", sample_dataset)
    plans = make_planner(comp, cutoff_len=100_000).plan_many(records)
    items = [GenItem(render_prompt_ids(comp, p.content, p.images), p.images, r.task)
             for r, p in zip(records, plans, strict=True)]
    paths = [img for item in items for img in item.images]
    assert len(paths) == 32
    reference = comp.template.mm_plugin._get_mm_inputs(paths, [], [], comp.processor)
    counts = [int(g.prod()) // comp.merge_length for g in reference["image_grid_thw"]]

    with ThreadPoolExecutor(4) as pool:
        serial = prepare_batch(comp, items)
        chunked = prepare_batch(comp, items, pool=pool, chunks=3)
        split = finish_on_device(comp, prepare_batch(comp, items, pool=pool, image_device="cpu"), "cpu")
    for batch in (serial, chunked, split):
        assert torch.equal(batch.mm["pixel_values"], reference["pixel_values"])
        assert torch.equal(batch.mm["image_grid_thw"], reference["image_grid_thw"])
        assert torch.equal(batch.input_ids, serial.input_ids)
        assert torch.equal(batch.attention_mask, serial.attention_mask)
    # the longest row is unpadded and carries its images' tokens in full
    k, rows = 0, []
    for item in items:
        rows.append(expand_image_tokens(item.prompt_ids, comp.image_pad_id, counts[k : k + len(item.images)]))
        k += len(item.images)
    longest = max(range(len(rows)), key=lambda i: len(rows[i]))
    assert serial.input_ids[longest].tolist() == rows[longest]


def test_length_sorted_batches_cover_every_index_once_longest_first():
    from mire_factory.infer.hf_backend import length_sorted_batches

    lengths = [5, 90, 13, 90, 41, 7, 66, 2, 30, 58]
    for first in (None, 1, 3, 4, 99):
        batches = length_sorted_batches(lengths, 4, first=first)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        flat = [lengths[i] for b in batches for i in b]
        assert flat == sorted(lengths, reverse=True)
        assert len(batches[0]) == min(first or 4, 4) and all(len(b) <= 4 for b in batches)
    assert length_sorted_batches([], 4, first=1) == []



def _overlap_probe():
    """(work, peaks): work(i) records how many calls were running when it started."""
    import asyncio

    state = {"active": 0}
    peaks: list[int] = []

    async def work(i, fail=False):
        state["active"] += 1
        peaks.append(state["active"])
        await asyncio.sleep(0.01)
        state["active"] -= 1
        if fail:
            raise OSError("bad image")
        return i

    return work, peaks


def test_vllm_first_render_runs_alone_then_the_rest_concurrently():
    """vLLM's processor cache is filled by the first render: it must run alone (FirstAlone), the rest together."""
    import asyncio

    from mire_factory.infer.vllm_backend import FirstAlone

    gate, (work, peaks) = FirstAlone(), _overlap_probe()

    async def go():
        return await asyncio.gather(*(gate(lambda i=i: work(i)) for i in range(6)))

    assert asyncio.run(go()) == list(range(6))
    assert peaks[0] == 1 and max(peaks) == 5  # the first alone; the other five overlapped


def test_vllm_first_render_that_fails_leaves_the_next_one_alone():
    import asyncio

    from mire_factory.infer.vllm_backend import FirstAlone

    gate, (work, peaks) = FirstAlone(), _overlap_probe()

    async def go():
        return await asyncio.gather(gate(lambda: work(0, fail=True)), *(gate(lambda i=i: work(i)) for i in (1, 2, 3)),
                                    return_exceptions=True)

    out = asyncio.run(go())
    assert isinstance(out[0], OSError) and out[1:] == [1, 2, 3]
    assert peaks[:2] == [1, 1] and max(peaks) == 2  # the failed first, then the next alone, then the last two
