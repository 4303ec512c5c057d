"""Decoding restricted to valid answers, for a random-weight model as much as a trained one.

- Label answers: a trie over each label's token ids as training tokenizes the assistant turn (label + <|im_end|>),
  used through transformers' `prefix_allowed_tokens_fn`.
- CoT JSON answers: a byte-level grammar {"理由": "<free text>", "所属类别": "<label>"} (either key order); the reason
  is free (no quote, backslash or control character: what a JSON string holds unescaped), everything else is fixed
  text or one of the labels. The reason is cut
  short when the remaining tokens are just enough to close the JSON, so the label always comes out.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..prompts import format_cot_answer

# JSON strings may not hold U+0000-U+001F unescaped: a reason with a raw tab fails json.loads (11 of 623 CoT answers on
# the H200's sixth lease, before control characters were excluded here).
FREE_FORBIDDEN = frozenset(b'"\\') | frozenset(range(0x20))
FREE_CHAR_REGEX = r'[^"\\\x00-\x1f]'


class LabelTrie:
    """Token-prefix trie over complete answers (label ids + stop id)."""

    def __init__(self, sequences: list[list[int]]):
        self.root: dict = {}
        for seq in sequences:
            node = self.root
            for tok in seq:
                node = node.setdefault(tok, {})

    def allowed(self, prefix: list[int]) -> list[int]:
        """Next tokens after `prefix`; [] when the prefix left the trie or finished an answer."""
        node = self.root
        for tok in prefix:
            node = node.get(tok)
            if node is None:
                return []
        return list(node)


def label_sequences(tokenizer, labels, stop_id: int) -> list[list[int]]:
    # The assistant turn is "{label}<|im_end|>": the label is tokenized on its own, a special token follows.
    return [tokenizer.encode(label, add_special_tokens=False) + [stop_id] for label in labels]


def make_prefix_allowed_tokens_fn(tries: list[LabelTrie], prompt_len: int, fallback_id: int):
    """For a left-padded batch: row b is constrained by tries[b]; finished rows get `fallback_id` (padding)."""

    def prefix_allowed_tokens_fn(batch_id: int, input_ids) -> list[int]:
        allowed = tries[batch_id].allowed(input_ids[prompt_len:].tolist())
        return allowed or [fallback_id]

    return prefix_allowed_tokens_fn


# ---------------------------------------------------------------- CoT grammar (byte level)

@functools.lru_cache(maxsize=4)
def vocab_bytes(tokenizer) -> tuple:
    """Each token id's bytes; None for special and added tokens. Byte-level BPE vocabularies (Qwen2's included)
    write bytes as GPT-2's printable characters: transformers' own table maps them back."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    decoder = {c: b for b, c in bytes_to_unicode().items()}
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    out = []
    for token_id, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if token_id in special or token is None or any(ch not in decoder for ch in token):
            out.append(None)
        else:
            out.append(bytes(decoder[ch] for ch in token))
    return tuple(out)


@dataclass(frozen=True)
class Path:
    """One way to answer: fixed text `a`, then (when `free`) free text, then fixed text `b`."""

    a: str
    b: str
    free: bool


def cot_paths(labels, label_position: str = "last") -> list[Path]:
    """The answer strings of format_cot_answer, with the reason left free: one path per label."""
    marker = "@@REASON@@"  # survives json.dumps unescaped
    paths = []
    for label in labels:
        text = format_cot_answer(marker, label, label_position)
        a, b = text.split(marker)
        paths.append(Path(a, b, True))
    return paths


def label_paths(labels) -> list[Path]:
    return [Path(label, "", False) for label in labels]


def answer_regex(paths: list[Path], max_free_chars: int | None = None, factor: bool = True) -> str:
    """The same language as a regular expression (vLLM structured outputs); the free text at most max_free_chars.

    factor: when every path shares the text before the free part (or after it), the free part is written once and
    the labels become one alternation: the same language, but one alternative per label each with its own bounded
    free run made xgrammar track every label's copy through the reason (on the H200, vLLM's CoT answers ran at
    2.6 s a record; benchmarks/cot_regex_xgrammar.py measures it). factor=False writes that form.
    """
    import re

    def literal(text: str) -> str:  # re.escape writes a space as "\\ ", an escape xgrammar (vLLM's) warns about
        return re.escape(text).replace("\\ ", " ")

    def one_of(texts: list[str]) -> str:
        return "(" + "|".join(literal(t) for t in dict.fromkeys(texts)) + ")"

    free = FREE_CHAR_REGEX + ("*" if max_free_chars is None else f"{{0,{max_free_chars}}}")
    if factor and paths and all(p.free for p in paths):
        if len({p.a for p in paths}) == 1:
            return "(" + literal(paths[0].a) + free + one_of([p.b for p in paths]) + ")"
        if len({p.b for p in paths}) == 1:
            return "(" + one_of([p.a for p in paths]) + free + literal(paths[0].b) + ")"
    alts = [literal(p.a) + (free if p.free else "") + literal(p.b) for p in paths]
    return "(" + "|".join(alts) + ")"


class Grammar:
    def __init__(self, paths: list[Path]):
        self.paths = paths
        self.enc = [(p.a.encode(), p.b.encode(), p.free) for p in paths]
        # Byte prefixes of every b that end on a character boundary: what a token may add when the free text ends.
        self.b_prefixes = {p.b[:k].encode() for p in paths if p.free for k in range(1, len(p.b) + 1)}
        self.max_fixed_tail_chars = max((len(p.b) for p in paths if p.free), default=0)

    def locate(self, data: bytes) -> list[tuple[int, str, int]]:
        """(path index, phase "a"|"free"|"b"|"done", byte offset in the phase's text) for every path still viable."""
        states = []
        for k, (a, b, free) in enumerate(self.enc):
            if len(data) < len(a):
                if a.startswith(data):
                    states.append((k, "a", len(data)))
                continue
            if not data.startswith(a):
                continue
            tail = data[len(a):]
            if free:
                q = tail.find(b'"')
                body = tail if q < 0 else tail[:q]
                if any(x in FREE_FORBIDDEN for x in body):
                    continue
                if q < 0:
                    states.append((k, "free", 0))
                    continue
                tail = tail[q:]
            if tail == b:
                states.append((k, "done", 0))
            elif b.startswith(tail):
                states.append((k, "b", len(tail)))
        return states

    def is_complete(self, data: bytes) -> bool:
        return any(phase == "done" for _, phase, _ in self.locate(data))


@functools.lru_cache(maxsize=4)
def _vocab_tables(tokenizer) -> tuple:
    """Per-tokenizer tables, built once: bytes by id, id by bytes, free-text mask, quote-bearing tokens."""
    import torch

    vocab = vocab_bytes(tokenizer)
    by_bytes = {v: i for i, v in enumerate(vocab) if v is not None}
    free_ok = [v is not None and len(v) > 0 and not any(x in FREE_FORBIDDEN for x in v) for v in vocab]
    # Tokens that end the free text: free bytes, a quote, then (checked per step) the start of the fixed tail.
    quote_tokens = []
    for i, v in enumerate(vocab):
        if v is not None and b'"' in v:
            q = v.find(b'"')
            if not any(x in FREE_FORBIDDEN for x in v[:q]):
                quote_tokens.append((i, v[q:]))
    return vocab, by_bytes, torch.tensor(free_ok, dtype=torch.bool), quote_tokens


class GrammarLogitsProcessor:
    """Masks each row's scores to the tokens that keep its answer inside the grammar (transformers LogitsProcessor)."""

    def __init__(self, grammars: list[Grammar], prompt_len: int, tokenizer, stop_id: int, max_new_tokens: int):

        self.grammars = grammars
        self.prompt_len = prompt_len
        self.stop_id = stop_id
        self.max_new_tokens = max_new_tokens
        self.vocab, self.by_bytes, self.free_mask, self.quote_tokens = _vocab_tables(tokenizer)
        self._fixed_cache: dict[tuple[str, int], list[int]] = {}

    def _fixed_tokens(self, text: str, offset: int) -> list[int]:
        """Tokens that are the next 1..n characters of `text` from byte `offset` (always a character boundary)."""
        key = (text, offset)
        if key not in self._fixed_cache:
            data = text.encode()
            rest = data[offset:].decode()
            ids = []
            for n in range(1, len(rest) + 1):
                tok = self.by_bytes.get(rest[:n].encode())
                if tok is not None:
                    ids.append(tok)
            self._fixed_cache[key] = ids
        return self._fixed_cache[key]

    def allowed(self, row: int, generated: list[int]) -> tuple[set[int], bool]:
        """(token ids, whether any free-text token is allowed too)."""
        grammar = self.grammars[row]
        pieces = [self.vocab[t] if t < len(self.vocab) else None for t in generated]
        if any(p is None for p in pieces):
            return {self.stop_id}, False  # finished (stop or padding) or off the grammar
        states = grammar.locate(b"".join(pieces))
        ids: set[int] = set()
        free = False
        for k, phase, offset in states:
            path = grammar.paths[k]
            if phase == "done":
                ids.add(self.stop_id)
            elif phase == "a":
                ids.update(self._fixed_tokens(path.a, offset))
            elif phase == "b":
                ids.update(self._fixed_tokens(path.b, offset))
            else:
                free = True
                ids.update(self._fixed_tokens(path.b, 0))
        if free:
            ids.update(i for i, tail in self.quote_tokens if tail in grammar.b_prefixes)
            # One token per character of the longest closing text, plus the stop token: then the reason must end.
            if len(generated) + grammar.max_fixed_tail_chars + 1 >= self.max_new_tokens:
                free = False
        return ids or {self.stop_id}, free

    def __call__(self, input_ids, scores):
        import torch

        for row in range(scores.shape[0]):
            ids, free = self.allowed(row, input_ids[row, self.prompt_len:].tolist())
            keep = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
            if free:
                n = min(len(self.free_mask), scores.shape[-1])
                keep[:n] = self.free_mask[:n].to(scores.device)
            keep[list(ids)] = True
            scores[row] = scores[row].masked_fill(~keep, float("-inf"))
        return scores
