"""Screenshot text in the prompt: the text of a record's images, from an info file (tools.extract_info), rendered as
the per-record context of the `screenshot_text` prompt variants, within a token budget.

The block, for a record with images (a record without images gets none):

    图片中的文字：
    <the first image's lines, in reading order>

and with several images each gets a numbered head, in the order the images appear in the record:

    图片中的文字：
    [图片1]
    <lines>
    [图片2]
    <lines>

An image without text shows 无. The whole block is at most `max_tokens` tokens of the real Qwen2 tokenizer: lines
are dropped from the end of the longest image's text first (whole lines, never a cut line), so a long page cannot
crowd out a short one. The same function renders every split, so training and inference read the same text.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from .image_info import InfoIndex, describe_origin, read_info_file
from .io import MireInputError, problem
from .records import MireRecord

DEFAULT_INFO_MAX_TOKENS = 256
HEADER = "图片中的文字："
EMPTY = "无"


def image_head(k: int) -> str:
    return f"[图片{k}]"


def render_block(texts: list[list[str]]) -> str:
    """The block for a record's images (each a list of lines); "" for none."""
    if not texts:
        return ""
    lines = [HEADER]
    for k, image_lines in enumerate(texts, start=1):
        if len(texts) > 1:
            lines.append(image_head(k))
        lines += image_lines or [EMPTY]
    return "\n".join(lines)


@lru_cache(maxsize=1)
def qwen2_counter() -> Callable[[str], int]:
    from .tiny_model import load_qwen2_tokenizer

    tokenizer = load_qwen2_tokenizer()
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))


def fit_block(texts: list[str], max_tokens: int, count_tokens: Callable[[str], int]) -> tuple[str, int]:
    """(block, lines dropped): the record's image texts rendered within max_tokens, dropping whole lines from the end
    of whichever image's kept text is longest. Lines are dropped by their own token counts first (Qwen2's
    pre-tokenizer splits at newlines, so the sum is close), then the real count of the block decides: more lines go
    while it is over, and dropped lines come back, last dropped first, while it stays within."""
    kept = [[line for line in text.split("\n") if line.strip()] for text in texts]
    cost = [[count_tokens(line) + 1 for line in lines] for lines in kept]  # + its newline
    fixed = count_tokens(render_block([[] for _ in kept]))  # the heads (and placeholders)
    dropped: list[tuple[int, str, int]] = []

    def drop_one() -> None:
        longest = max(range(len(kept)), key=lambda k: (sum(cost[k]), -k))
        if not kept[longest]:
            raise MireInputError(f"--info_max_tokens {max_tokens} is below the block's heads alone "
                                 f"({count_tokens(render_block(kept))} tokens)")
        dropped.append((longest, kept[longest].pop(), cost[longest].pop()))

    while fixed + sum(map(sum, cost)) > max_tokens and any(kept):
        drop_one()
    while count_tokens(render_block(kept)) > max_tokens:
        drop_one()
    while dropped:
        k, line, c = dropped[-1]
        kept[k].append(line)
        if count_tokens(render_block(kept)) > max_tokens:
            kept[k].pop()
            break
        cost[k].append(c)
        dropped.pop()
    return render_block(kept), len(dropped)


class ScreenshotText:
    """Contexts for records, from one info file."""

    def __init__(self, info_file: str | os.PathLike, max_tokens: int = DEFAULT_INFO_MAX_TOKENS,
                 count_tokens: Callable[[str], int] | None = None):
        if max_tokens < 1:
            raise MireInputError(f"--info_max_tokens must be at least 1, got {max_tokens}")
        self.info_file = Path(info_file)
        self.index: InfoIndex = read_info_file(info_file)
        self.max_tokens = max_tokens
        self.count_tokens = count_tokens or qwen2_counter()
        self.truncated_records = 0
        self.dropped_lines = 0

    def contexts(self, records: list[MireRecord], image_dir: str | os.PathLike, source: str | os.PathLike
                 ) -> list[str]:
        """Each record's block ("" without images); MireInputError naming every image the file has no text for."""
        problems, out = [], []
        for record in records:
            texts = []
            for name in record.images:
                text = self.index.text_for(Path(image_dir) / name)
                if text is None:
                    why = ("its row there was made from other bytes (the image changed): run tools.extract_info "
                           "again" if name in self.index.by_name else "run tools.extract_info on these images")
                    problems.append(problem(source, record.id, "image", f"{name}: no text in {self.info_file} "
                                            f"({why})"))
                texts.append(text or "")
            if not texts:
                out.append("")
                continue
            block, dropped = fit_block(texts, self.max_tokens, self.count_tokens)
            self.truncated_records += dropped > 0
            self.dropped_lines += dropped
            out.append(block)
        if problems:
            raise MireInputError(problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else []))
        return out

    def registration(self) -> dict:
        """What convert records beside the prompt variant in dataset_info.json (LLaMA-Factory ignores the key)."""
        origin = self.index.origin
        return {"info_file": str(self.info_file.resolve()), "info_max_tokens": self.max_tokens,
                "origin": describe_origin(origin) if origin else "several origins",
                "records_truncated": self.truncated_records, "lines_dropped": self.dropped_lines}
