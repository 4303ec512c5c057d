from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mire_factory.content import join_content_parts, to_content_parts
from mire_factory.records import IMAGE_PLACEHOLDER, MireRecord, load_records
from mire_factory.synthetic import make_records


def _roundtrip(record, image_dir):
    parts = to_content_parts(record, image_dir)
    instruction, images = join_content_parts(parts)
    assert instruction == record.instruction
    assert images == [str(Path(image_dir) / name) for name in record.images]
    # no empty text parts, and images appear exactly where the placeholders were
    assert all(p["text"] for p in parts if p["type"] == "text")
    assert sum(p["type"] == "image" for p in parts) == record.instruction.count(IMAGE_PLACEHOLDER)
    return parts


def test_roundtrip_real_sample(mire_sample):
    records = load_records(mire_sample / "train_sample.json", mire_sample / "images")
    seen_counts = set()
    for record in records:
        parts = _roundtrip(record, mire_sample / "images")
        seen_counts.add(len(record.images))
        for p in parts:
            if p["type"] == "image":
                assert Path(p["image"]).is_file()
    assert {0, 1, 3, 4} <= seen_counts  # the 0-image and 4-image dialogues are in the sample
    # the image prompt starts with "Picture 1: " then the image: the first part is text, the second the image
    image_record = next(r for r in records if r.task == "image")
    parts = to_content_parts(image_record, mire_sample / "images")
    assert [p["type"] for p in parts[:3]] == ["text", "image", "text"] and parts[0]["text"] == "Picture 1: "


def _record(instruction: str, images: list[str]) -> MireRecord:
    return MireRecord(id="r", instruction=instruction, images=images, task="image")


def test_roundtrip_synthetic_records(tmp_path):
    for raw in make_records(5, 20, tmp_path, seed=7, max_dialogue_images=4):
        parts = to_content_parts(_record(raw["instruction"], raw["image"]))  # no image_dir: names as given
        assert join_content_parts(parts) == (raw["instruction"], raw["image"])


_text = st.text(alphabet=st.sampled_from(list("ab 用户客服:：，,。\n<>image")), max_size=12).filter(
    lambda s: IMAGE_PLACEHOLDER not in s)


@given(segments=st.lists(_text, min_size=1, max_size=8))
def test_roundtrip_any_layout(segments):
    # leading, trailing and adjacent images, empty texts: the order and the text survive exactly
    instruction = IMAGE_PLACEHOLDER.join(segments)
    if instruction.count(IMAGE_PLACEHOLDER) != len(segments) - 1:  # a segment edge formed a placeholder
        return
    images = [f"img{k}.jpg" for k in range(len(segments) - 1)]
    parts = to_content_parts(_record(instruction, images))
    assert join_content_parts(parts) == (instruction, images)


def test_count_mismatch_and_unknown_part():
    with pytest.raises(ValueError, match="placeholders"):
        to_content_parts(_record("a<image>b", []))
    with pytest.raises(ValueError, match="unknown content part"):
        join_content_parts([{"type": "video", "video": "v.mp4"}])
