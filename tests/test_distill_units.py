"""tools.distill building blocks: reply parsing, refusals, backoff, request building, the resumable reasons file."""

from __future__ import annotations

import base64
import io
import json
import random

import pytest
from PIL import Image
from qwen_vl_utils.vision_process import smart_resize

from mire_factory.distill import DistillConfig, ReasonsLog, build_request, plan_work, reason_from_response
from mire_factory.reasons import ReasonRecord
from mire_factory.records import load_records
from mire_factory.synthetic import make_records, write_dataset
from mire_factory.teacher import backoff_s, elide_images, retry_after_s
from mire_factory.teacher_reply import parse_reply, refusal_reason

GOLD = "退货页面"


@pytest.mark.parametrize(
    "text",
    [
        '{"理由": "页面显示退货进度", "所属类别": "退货页面"}',
        '```json\n{"理由": "页面显示退货进度", "所属类别": "退货页面"}\n```',
        '好的，结果如下：\n{"理由": "页面显示退货进度", "所属类别": "退货页面"}\n希望对你有帮助。',
        "{'理由': '页面显示退货进度', '所属类别': '退货页面'}",
        '{"理由": "页面显示退货进度", "所属类别": "「退货页面」。"}',
        '{"理由": "页面显示退货进度", "所属类别": "退货页面"',  # cut at the closing brace
        '"理由": "页面显示退货进度",\n"所属类别": "退货页面"',  # no braces at all
        '{"reason": "页面显示退货进度", "label": "退货页面"}',
    ],
)
def test_parse_reply_reads_messy_json(text):
    parsed = parse_reply(text, "image")
    assert parsed.ok, parsed.error
    assert parsed.label == GOLD
    assert parsed.reason == "页面显示退货进度"


@pytest.mark.parametrize("text", ["", "这张图片看起来很清楚。", '{"理由": "只有理由"}', "[1, 2, 3]"])
def test_parse_reply_reports_what_it_cannot_read(text):
    parsed = parse_reply(text, "image")
    assert not parsed.ok and parsed.error


def test_parse_reply_keeps_a_label_outside_the_set_and_fixes_a_padded_one():
    assert parse_reply('{"理由": "x", "所属类别": "未知页面"}', "image").label == "未知页面"
    assert parse_reply('{"理由": "x", "所属类别": "分类标签：退货页面（用户想退货）"}', "image").label == GOLD


def test_refusals():
    assert refusal_reason("", "content_filter").startswith("content_filter")
    assert refusal_reason(None, "stop", refusal="I can't help").startswith("refusal")
    assert refusal_reason("抱歉，我无法协助处理这个请求。", "stop").startswith("refusal")
    assert refusal_reason("I'm sorry, but I can't help with that.", "stop")
    # a reason that merely says 无法 is an answer, not a refusal
    assert refusal_reason('{"理由": "抱歉，用户无法提供订单号", "所属类别": "退货页面"}', "stop") is None
    assert refusal_reason("这张图片看起来很清楚。", "stop") is None


def test_retry_after_and_backoff():
    assert retry_after_s({"retry-after": "2"}) == 2.0
    assert retry_after_s({"retry-after-ms": "250"}) == 0.25
    assert retry_after_s({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # a date in the past
    assert retry_after_s({}) is None and retry_after_s({"retry-after": "soon"}) is None
    rng = random.Random(0)
    delays = [backoff_s(k, 1.0, 8.0, rng) for k in range(6)]
    for k, d in enumerate(delays):
        cap = min(8.0, 2**k)
        assert cap / 2 <= d <= cap
    assert len({round(backoff_s(3, 1.0, 60, rng), 6) for _ in range(20)}) > 1  # jittered


@pytest.fixture(scope="module")
def image_records(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill_units")
    write_dataset(root / "train.json", make_records(3, 6, root / "images", seed=2, image_size=(300, 620)))
    return load_records(root / "train.json", root / "images"), root / "images"


def _decode(url: str) -> Image.Image:
    head, data = url.split(",", 1)
    assert head == "data:image/jpeg;base64"
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_build_request_puts_resized_images_at_their_placeholders(image_records):
    records, image_dir = image_records
    cfg = DistillConfig(base_url="http://x", model="t", modes=[3], max_pixels=40000, max_chars=50, max_tokens=64)
    record = max(records, key=lambda r: len(r.images))
    assert len(record.images) >= 2
    request = build_request(record, image_dir, 3, cfg)
    assert request["model"] == "t" and request["max_tokens"] == 64
    (message,) = request["messages"]
    parts = message["content"]
    images = [p for p in parts if p["type"] == "image_url"]
    assert len(images) == len(record.images)
    text = "".join("<image>" if p["type"] == "image_url" else p["text"] for p in parts)
    assert text.startswith(record.instruction.rstrip("\n"))  # images sit exactly where <image> was
    assert f"「{record.output}」" in parts[-1]["text"] and "不超过50个字" in parts[-1]["text"]
    for part in images:
        img = _decode(part["image_url"]["url"])
        assert img.width % 28 == 0 and img.height % 28 == 0 and img.width * img.height <= 40000
        assert (img.height, img.width) == smart_resize(620, 300, factor=28, min_pixels=3136, max_pixels=40000)
    shown = json.dumps(elide_images(request), ensure_ascii=False)
    assert "base64 characters elided" in shown and len(shown) < 6000
    mode1 = build_request(record, image_dir, 1, cfg)["messages"][0]["content"][-1]["text"]
    assert record.output not in mode1.split("<用户与客服的对话 END>")[-1].split("[")[0]


def test_reason_from_response_statuses(image_records):
    records, _ = image_records
    rec = records[0]

    def body(content, finish="stop", **extra):
        return {"choices": [{"message": {"role": "assistant", "content": content, **extra}, "finish_reason": finish}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}

    ok = reason_from_response(body(json.dumps({"理由": "r", "所属类别": rec.output}, ensure_ascii=False)), rec, 2, "m")
    assert (ok.status, ok.label, ok.gold, ok.task, ok.usage["total_tokens"]) == ("ok", rec.output, rec.output,
                                                                                 rec.task, 15)
    assert reason_from_response(body("", "content_filter"), rec, 2, "m").status == "refused"
    assert reason_from_response(body(None, refusal="no"), rec, 2, "m").status == "refused"
    cut = reason_from_response(body('{"理由": "很长很长', "length"), rec, 2, "m")
    assert cut.status == "failed" and "max_tokens" in cut.error and cut.raw == '{"理由": "很长很长'


def _line(rid, status, mode=1, model="m"):
    return ReasonRecord(id=rid, mode=mode, model=model, status=status, error=None if status == "ok" else "x")


def test_reasons_log_repairs_a_cut_line_and_drops_retried_failures(tmp_path, image_records):
    path = tmp_path / "r.jsonl"
    with ReasonsLog(path) as log:
        for rec in (_line("a", "ok"), _line("b", "failed"), _line("c", "refused"), _line("b", "failed", mode=2)):
            log.append(rec)
    with open(path, "ab") as f:
        f.write(b'{"id": "d", "mode": 1, "mo')  # what a kill in the middle of a write leaves
    log = ReasonsLog(path)
    rows = log.load()
    assert [r.id for r in rows] == ["a", "b", "c", "b"] and log.repaired_bytes > 0
    assert path.read_bytes().endswith(b"\n")
    assert log.rewrite_without({("b", 1, "m")}) == 1
    assert [(r.id, r.mode) for r in ReasonsLog(path).load()] == [("a", 1), ("c", 1), ("b", 2)]


def test_plan_work_skips_done_and_failed_unless_retried(image_records):
    records, _ = image_records
    ids = [r.id for r in records]
    existing = [_line(ids[0], "ok"), _line(ids[1], "refused"), _line(ids[2], "failed"), _line(ids[3], "ok", model="x")]
    plan = plan_work(records, [1], "m", existing)
    assert (plan.skipped_done, plan.skipped_failed, len(plan.todo)) == (2, 1, len(records) - 3)
    plan = plan_work(records, [1, 2], "m", existing, retry_failed=True)
    assert plan.retrying == {(ids[2], 1, "m")} and len(plan.todo) == 2 * len(records) - 2
