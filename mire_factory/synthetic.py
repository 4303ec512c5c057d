"""Synthetic MIRE-format records and images, for tests and the demo.

Both tasks use the official instruction texts. Each class carries a signal a small model can learn: a class colour
and stripe pattern in the pixels, and class phrases in the last user turn of a dialogue.
"""

from __future__ import annotations

import colorsys
import random
from pathlib import Path

from PIL import Image, ImageDraw

from .io import write_json_atomic
from .taxonomy import (
    DIALOGUE_LABELS,
    IMAGE_INSTRUCTION,
    IMAGE_LABELS,
    RETIRED_IMAGE_LABELS,
    build_dialogue_instruction,
)

# Phrases a customer would use for each intent; the last user turn draws from its class.
DIALOGUE_PHRASES: dict[str, tuple[str, ...]] = {
    "反馈密封性不好": ("盖子拧紧了还是漏水", "密封不好，一倒过来就漏", "瓶口漏了一包里都是水"),
    "是否好用": ("这个好用吗", "用起来顺手吗", "大家都说好用吗"),
    "是否会生锈": ("这个会生锈吗", "用久了会不会有锈迹", "不锈钢的会生锈吗"),
    "排水方式": ("洗衣机是上排水还是下排水", "热水器怎么排水", "排水管接在哪里"),
    "包装区别": ("礼盒装和普通装有什么区别", "两种包装哪里不一样", "简装和盒装差在哪"),
    "发货数量": ("一单发几件", "拍两件会发几个", "发货是一盒还是两盒"),
    "反馈用后症状": ("用完脸上起红疹了", "抹了以后皮肤发痒", "吃了以后肚子不舒服"),
    "商品材质": ("这是什么材质的", "面料是纯棉的吗", "里面的填充物是什么"),
    "功效功能": ("这个有什么功效", "能美白吗", "具体有哪些功能"),
    "是否易褪色": ("洗了会掉色吗", "会不会褪色", "颜色洗几次就淡了吗"),
    "适用季节": ("夏天能穿吗", "适合冬天用吗", "春秋季节可以吗"),
    "能否调光": ("灯光亮度能调吗", "可以调光吗", "能不能调成暖光"),
    "版本款型区别": ("标准版和升级版有什么区别", "这两个型号差在哪", "A款和B款哪里不同"),
    "单品推荐": ("有什么推荐的吗", "帮我推荐一款", "哪一款比较适合我"),
    "用法用量": ("一次用多少", "怎么使用", "每天用几次"),
    "控制方式": ("能用手机控制吗", "怎么遥控", "支持电脑控制吗"),
    "上市时间": ("这款什么时候上市的", "是今年的新款吗", "哪一年出的"),
    "商品规格": ("一瓶多少毫升", "净含量是多少", "一包有多重"),
    "信号情况": ("这手机信号好吗", "信号不好怎么办", "在地下室有信号吗"),
    "养护方法": ("平时怎么保养", "皮面怎么养护", "需要怎么清洁保养"),
    "套装推荐": ("有没有套装推荐", "推荐一套组合", "买一整套哪个划算"),
    "何时上货": ("什么时候补货", "售罄了何时上货", "多久能到货补上"),
    "气泡": ("贴膜有气泡怎么办", "怎么贴才不起泡", "膜里的气泡怎么弄掉"),
}

_OPENERS = ("<http>", "在吗", "你好", "您好，请问一下", "交易详情：包含1件商品，订单标识已隐私处理。")
_AGENT_REPLIES = (
    "亲爱的，在的呢，请问有什么可以帮您？",
    "您好！这款商品您遇到了什么问题吗？",
    "亲爱的顾客，我们的智能助手还不能识别图片内容，请您用文字简单描述一下。",
    "好的亲，这边帮您看一下哦~",
)

DEFAULT_IMAGE_CLASSES = tuple(label for label in IMAGE_LABELS if label not in RETIRED_IMAGE_LABELS)


def class_color(index: int, n: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(index / max(n, 1), 0.85, 0.9)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_class_image(index: int, n: int, size: tuple[int, int], rng: random.Random) -> Image.Image:
    """A class colour background with a class-specific number of stripes, plus noise blocks."""
    width, height = size
    img = Image.new("RGB", size, class_color(index, n))
    draw = ImageDraw.Draw(img)
    stripes = 1 + index % 4
    for k in range(stripes):
        y = int((k + 1) * height / (stripes + 1))
        draw.rectangle([0, y - max(1, height // 40), width, y + max(1, height // 40)], fill=(255, 255, 255))
    for _ in range(3):
        x, y = rng.randrange(width), rng.randrange(height)
        w, h = max(2, width // 10), max(2, height // 10)
        shade = rng.randrange(0, 80)
        draw.rectangle([x, y, x + w, y + h], fill=(shade, shade, shade))
    return img


def make_records(
    n_image: int,
    n_dialogue: int,
    image_dir: str | Path,
    seed: int = 0,
    image_classes: tuple[str, ...] = DEFAULT_IMAGE_CLASSES,
    dialogue_classes: tuple[str, ...] = DIALOGUE_LABELS,
    image_size: tuple[int, int] = (56, 56),
    max_dialogue_images: int = 4,
    phrase_turns: int = 1,
    id_prefix: str = "syn",
    with_labels: bool = True,
    image_format: str = "PNG",
) -> list[dict]:
    """MIRE-format records (train format when with_labels, else test format); images are written to image_dir."""
    rng = random.Random(seed)
    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    ext = "jpg" if image_format.upper() == "JPEG" else image_format.lower()
    records: list[dict] = []

    def save(img: Image.Image, name: str) -> str:
        img.save(image_dir / name, format=image_format)
        return name

    for i in range(n_image):
        label = image_classes[i % len(image_classes)]
        rid = f"{id_prefix}-img-{seed}-{i:05d}"
        img = draw_class_image(image_classes.index(label), len(image_classes), image_size, rng)
        records.append({"id": rid, "instruction": IMAGE_INSTRUCTION, "input": "", "output": label,
                        "image": [save(img, f"{rid}-0.{ext}")]})
    for i in range(n_dialogue):
        label = dialogue_classes[i % len(dialogue_classes)]
        rid = f"{id_prefix}-dlg-{seed}-{i:05d}"
        n_images = rng.randint(0, max_dialogue_images)
        turns: list[tuple[str, str]] = [("用户", rng.choice(_OPENERS)), ("客服", rng.choice(_AGENT_REPLIES))]
        names = []
        for k in range(n_images):
            img = draw_class_image(dialogue_classes.index(label), len(dialogue_classes), image_size, rng)
            names.append(save(img, f"{rid}-{k}.{ext}"))
            turns += [("用户", "<image>"), ("客服", rng.choice(_AGENT_REPLIES))]
        for _ in range(phrase_turns - 1):  # earlier mentions of the intent, as customers repeat themselves
            turns += [("用户", rng.choice(DIALOGUE_PHRASES[label])), ("客服", rng.choice(_AGENT_REPLIES))]
        turns += [("用户", rng.choice(DIALOGUE_PHRASES[label])), ("客服", "")]
        records.append({"id": rid, "instruction": build_dialogue_instruction(turns), "input": "", "output": label,
                        "image": names})
    rng.shuffle(records)
    if not with_labels:
        for r in records:
            r.pop("output")
    return records


def write_dataset(path: str | Path, records: list[dict]) -> None:
    write_json_atomic(path, records)
