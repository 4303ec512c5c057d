"""Reading a teacher's reply: the {"理由", "所属类别"} JSON however it came wrapped, and refusals.

Teachers rarely answer with clean JSON: code fences, a sentence before or after, single quotes, Python-style dicts,
a missing closing brace when max_tokens cut the reply. What can be read is read; what cannot is reported with why.
"""

from __future__ import annotations

import ast
import json
import re
import unicodedata
from dataclasses import dataclass

from .prompts import LABEL_KEY, REASON_KEY
from .taxonomy import LABELS, Task, fix_label, normalize_label

# Keys teachers use instead of ours (English prompts, translated answers).
_REASON_KEYS = (REASON_KEY, "reason", "reasoning", "理由说明", "分析", "原因")
_LABEL_KEYS = (LABEL_KEY, "label", "category", "类别", "分类标签", "分类", "标签", "意图")


_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.S)
_REFUSAL_PATTERNS = re.compile(
    r"(I'?m sorry|I am sorry|I can(?:no|')t (?:help|assist|comply)|I cannot (?:help|assist|comply)|"
    r"unable to (?:help|assist|comply)|against (?:my|the) (?:policy|policies)|"
    r"抱歉.{0,12}(?:无法|不能)|(?:无法|不能)(?:提供|协助|处理|回答)(?:这|该|此)|违反.{0,6}(?:政策|规定)|作为一个?AI)",
    re.I,
)


@dataclass
class Completion:
    """What we use of an OpenAI-style chat completion body."""

    text: str | None
    finish_reason: str | None
    refusal: str | None
    usage: dict


_USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")


def read_completion(body: object) -> Completion:
    """The first choice's text, finish reason and refusal, and the token usage; ValueError saying what is wrong
    when the body is not shaped like a chat completion (servers and proxies send anything)."""
    if not isinstance(body, dict):
        raise ValueError(f"the body is a JSON {type(body).__name__}, not an object")
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        raise ValueError("no choices in the response")
    choice = choices[0]
    if not isinstance(choice, dict):
        raise ValueError(f"choices[0] is a JSON {type(choice).__name__}, not an object")
    message = choice.get("message")
    if not isinstance(message, dict):
        raise ValueError("no message in the first choice")
    text = message.get("content")
    if isinstance(text, list):  # some servers return content parts
        if not all(isinstance(p, dict) and isinstance(p.get("text", ""), str) for p in text):
            raise ValueError("content parts without text")
        text = "".join(p.get("text", "") for p in text)
    elif text is not None and not isinstance(text, str):
        raise ValueError(f"message content is a JSON {type(text).__name__}, not a string")
    finish = choice.get("finish_reason")
    refusal = message.get("refusal")
    if refusal is not None and not isinstance(refusal, str):
        # `refusal: true` and the like: the server says it refused, without words
        refusal = json.dumps(refusal, ensure_ascii=False)[:200] if refusal not in (False, 0, "", [], {}) else None
    usage = body.get("usage")
    counts = {k: int(v) for k, v in usage.items() if k in _USAGE_KEYS and isinstance(v, int | float)
              and not isinstance(v, bool) and 0 <= v < 2**53} if isinstance(usage, dict) else {}
    return Completion(text, finish if isinstance(finish, str) else None, refusal, counts)


@dataclass
class ParsedReply:
    reason: str | None
    label: str | None
    error: str | None = None  # why the reply could not be read; None when reason and label were found

    @property
    def ok(self) -> bool:
        return self.error is None


def _candidates(text: str) -> list[str]:
    """Substrings that may hold the JSON object, most specific first."""
    found = [m.group(1) for m in _FENCE.finditer(text)]
    start = text.find("{")
    if start >= 0:
        end = text.rfind("}")
        found.append(text[start : end + 1] if end > start else text[start:])
        # Balanced first object: handles "{...} and then {...}" or trailing braces in commentary.
        depth, in_str, quote, esc = 0, False, "", False
        for k in range(start, len(text)):
            ch = text[k]
            if in_str:
                esc = (ch == "\\") and not esc
                if ch == quote and not esc:
                    in_str = False
                continue
            if ch in "\"'":
                in_str, quote = True, ch
            elif ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    found.append(text[start : k + 1])
                    break
    found.append(text)
    return found


def _load_object(chunk: str) -> dict | None:
    chunk = chunk.strip()
    if not chunk:
        return None
    attempts = [chunk]
    if chunk.startswith("{") and not chunk.rstrip().endswith("}"):
        attempts.append(chunk.rstrip().rstrip(",") + ('"}' if chunk.count('"') % 2 else "}"))  # cut by max_tokens
    for attempt in attempts:
        try:
            obj = json.loads(attempt)
        except RecursionError:
            continue
        except json.JSONDecodeError:
            try:
                obj = ast.literal_eval(attempt)  # single quotes, Python-style dicts
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
        if isinstance(obj, dict):
            return obj
    return None


def parse_json_object(text: str | None) -> dict | None:
    """The first JSON object a reply holds (fenced, wrapped in prose, single-quoted or cut at max_tokens), else None."""
    if not text or not text.strip():
        return None
    for chunk in _candidates(text):
        obj = _load_object(chunk)
        if obj is not None:
            return obj
    return None


def _pick(obj: dict, keys: tuple[str, ...]) -> str | None:
    lowered = {str(k).strip().lower(): v for k, v in obj.items()}
    for key in keys:
        value = lowered.get(key.lower())
        if value is not None and str(value).strip():
            return str(value).strip()
    return None


def _regex_fields(text: str) -> dict:
    """Key-value pairs in broken JSON: "理由": "...", '所属类别': '...', 所属类别：xxx."""
    out = {}
    for key in (*_REASON_KEYS[:1], *_LABEL_KEYS[:1]):
        m = re.search(rf"""["']?{re.escape(key)}["']?\s*[:：]\s*(["'“])(.*?)(?:\1|["'”](?=\s*[,，}}\n])|$)""", text, re.S)
        if m is None:
            m = re.search(rf"""["']?{re.escape(key)}["']?\s*[:：]\s*([^,，\n}}]+)""", text)
            if m is not None:
                out[key] = m.group(1).strip().strip("\"'“”")
            continue
        out[key] = m.group(2).strip()
    return out


def canonical_label(text: str, task: Task | None) -> str:
    """The label in the teacher's answer: canonical when it is one (or clearly contains one), else the cleaned text."""
    label = normalize_label(text)
    if task is None or label in LABELS[task]:
        return label
    fixed, _ = fix_label(label, task)
    return fixed if _fold(fixed) in _fold(label) else label  # a padded answer; never a guess by similarity


def _fold(text: str) -> str:
    return re.sub(r"\s+", "", unicodedata.normalize("NFKC", text)).lower()


def parse_reply(text: str | None, task: Task | None = None) -> ParsedReply:
    """The reason and the label of a reply; `error` says why when either is missing."""
    if text is None or not text.strip():
        return ParsedReply(None, None, "empty reply")
    obj = None
    for chunk in _candidates(text):
        obj = _load_object(chunk)
        if obj is not None and (_pick(obj, _LABEL_KEYS) is not None or _pick(obj, _REASON_KEYS) is not None):
            break
        obj = None
    if obj is None:
        obj = _regex_fields(text) or None
    if obj is None:
        return ParsedReply(None, None, "unparseable reply: no JSON object with 理由/所属类别")
    reason, label = _pick(obj, _REASON_KEYS), _pick(obj, _LABEL_KEYS)
    if label is None:
        return ParsedReply(reason, None, f"reply has no '{LABEL_KEY}' field")
    label = canonical_label(label, task)
    if reason is None:
        return ParsedReply(None, label, f"reply has no '{REASON_KEY}' field")
    return ParsedReply(reason, label)


def refusal_reason(text: str | None, finish_reason: str | None = None, refusal: str | None = None) -> str | None:
    """Why this reply is a refusal (content filter, the API's refusal field, a refusal sentence), else None.

    A refusal sentence only counts when the reply holds no answer: a reason that says "不能" is not a refusal.
    """
    if finish_reason == "content_filter":
        return "content_filter: the provider filtered the reply"
    if refusal:
        return f"refusal: {refusal.strip()[:200]}"
    if text and _REFUSAL_PATTERNS.search(text) and not parse_reply(text).ok:
        return f"refusal: {text.strip()[:200]}"
    return None
