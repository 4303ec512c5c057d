"""CoT training data: a converted train file + teacher reasons -> training rows that teach the reasons, in one of
two layouts (COT_LAYOUTS), every assistant turn within the competition's output-token budget:

- inline (the default): a file converted with a CoT prompt variant; the answer is `{"理由": ..., "所属类别": ...}`
  in the variant's format, so the model writes the reason at inference too.
- second_turn: a file converted with a label prompt variant (plain, screenshot_text); the first exchange is the
  record's own (its user turn, the bare label as the variant answers it), then a second one asks for the reason
  (prompts.REASON_QUESTION) and the reason answers it. The model learns from the reason (LLaMA-Factory trains every
  assistant turn, unless mask_history, which trains the last one only), but inference asks only the first exchange:
  the test file converted with the same label variant is that user turn, and the answer is a bare label.

The user turns stay as tools.convert wrote them (for CoT variants definitions and answer format included), so the
test file converted with the same variant gives the same prompts. The output's registration records the variant
(what inference reads: answer format, refusal of another variant) and, for second_turn, the layout."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .augment import source_id
from .corrections import registered_reason_fixes
from .dataset_info import COT_LAYOUT_KEY, commit_registrations, entry_variant, file_registration, read_dataset_info
from .io import MireInputError, OutputSet, problem
from .prompt_variants import PROMPT_VARIANTS, PromptVariant, get_prompt_variant
from .prompts import REASON_QUESTION
from .reasons import ReasonRecord, load_reasons
from .rules import MAX_NEW_TOKENS
from .sharegpt import chat_row, read_sharegpt, sharegpt_entry
from .taxonomy import normalize_label

INLINE, SECOND_TURN = "inline", "second_turn"
COT_LAYOUTS = (INLINE, SECOND_TURN)  # the reason inside the answer (CoT variants) / as a second exchange (label ones)
COT_VARIANTS = tuple(name for name, v in PROMPT_VARIANTS.items() if v.answer_format == "cot")
LABEL_VARIANTS = tuple(name for name, v in PROMPT_VARIANTS.items() if v.answer_format == "label")
# A sentence ends after one of these; the piece keeps its punctuation.
_SENTENCE_END = re.compile(r"(?<=[。！？!?；;…\n])")


def sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text) if s]


def qwen2_token_counter() -> Callable[[str], int]:
    """Tokens of an assistant turn as the model generates it: its text plus the closing <|im_end|>, which also
    counts against max_new_tokens; so an answer of N counted tokens finishes within N generated tokens."""
    from .tiny_model import load_qwen2_tokenizer

    tokenizer = load_qwen2_tokenizer()
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False)) + 1


def _fit_reason(reason: str, render: Callable[[str], str], count_tokens: Callable[[str], int],
                max_tokens: int) -> tuple[str, str]:
    """(reason, how): the whole reason ("full"), its longest prefix of whole sentences whose rendered turn fits
    ("shortened"), or "" ("label_only")."""
    reason = reason.strip()
    if count_tokens(render(reason)) <= max_tokens:
        return reason, "full"
    parts = sentences(reason)
    for k in range(len(parts) - 1, 0, -1):
        cut = "".join(parts[:k]).strip()
        if count_tokens(render(cut)) <= max_tokens:
            return cut, "shortened"
    return "", "label_only"


def _check_label_fits(answer: str, count_tokens: Callable[[str], int], max_tokens: int) -> None:
    if count_tokens(answer) > max_tokens:
        raise MireInputError(f"--max_output_tokens {max_tokens} is below the label-only answer {answer} "
                             f"({count_tokens(answer)} tokens)")


def fit_answer(
    reason: str, label: str, count_tokens: Callable[[str], int], max_tokens: int,
    variant: PromptVariant | None = None,
) -> tuple[str, str]:
    """(answer, how) in the variant's answer format (default cot): the whole reason ("full"), its longest prefix of
    whole sentences that fits ("shortened"), or an empty reason ("label_only")."""
    variant = variant or get_prompt_variant("cot")
    reason, how = _fit_reason(reason, lambda r: variant.answer(label, r), count_tokens, max_tokens)
    answer = variant.answer(label, reason)
    _check_label_fits(answer, count_tokens, max_tokens)
    return answer, how


def fit_turns(
    layout: str, reason: str, label: str, count_tokens: Callable[[str], int], max_tokens: int,
    variant: PromptVariant,
) -> tuple[str, list[tuple[str, str]], str]:
    """(first answer, follow-up exchanges, how) of one record in `layout`, each assistant turn within max_tokens.
    inline: fit_answer, no follow-up. second_turn: the bare label as the (label) variant answers it, then
    (REASON_QUESTION, the reason, whole or shortened at a sentence boundary); none when no part of it fits."""
    if layout == INLINE:
        answer, how = fit_answer(reason, label, count_tokens, max_tokens, variant)
        return answer, [], how
    if layout != SECOND_TURN:
        raise ValueError(f"unknown CoT layout {layout!r} (choices: {', '.join(COT_LAYOUTS)})")
    answer = variant.answer(label)
    _check_label_fits(answer, count_tokens, max_tokens)
    reason, how = _fit_reason(reason, lambda r: r, count_tokens, max_tokens)
    if not reason:  # no sentence of it fits (or none given): the first exchange alone
        return answer, [], "label_only"
    return answer, [(REASON_QUESTION, reason)], how


def source_variant(dataset_file: str | os.PathLike, layout: str = INLINE) -> tuple[str, PromptVariant]:
    """The name the train file is registered under beside it, and the prompt variant it was converted with: a CoT
    one for the inline layout, a label one for second_turn."""
    found = file_registration(dataset_file)
    wanted, kind = (COT_VARIANTS, "CoT") if layout == INLINE else (LABEL_VARIANTS, "label")
    hint = (f"for --layout {layout} convert the train file with tools.convert --prompt_variant {' or '.join(wanted)} "
            "(and the test file with the same variant, so that inference prompts equal training ones)")
    if found is None:
        raise MireInputError(problem(dataset_file, None, None, f"not registered in the dataset_info.json beside it; {hint}"))
    name, entry = found
    variant = entry_variant(entry, Path(dataset_file).parent / "dataset_info.json", name)
    if entry.get(COT_LAYOUT_KEY) is not None:
        raise MireInputError(problem(dataset_file, None, None, f"registered as {name!r}, already merged "
                                     f"({COT_LAYOUT_KEY} {entry[COT_LAYOUT_KEY]!r}); give the train file tools.convert "
                                     "wrote"))
    if variant.name not in wanted:
        raise MireInputError(problem(dataset_file, None, None,
                                     f"registered as {name!r} with prompt variant {variant.name!r}, not a {kind} one; "
                                     f"{hint}"))
    return name, variant


@dataclass
class MergeReport:
    output_file: Path
    dataset_name: str
    layout: str = INLINE
    written: int = 0
    full: int = 0
    shortened: int = 0
    label_only: int = 0
    max_tokens_seen: int = 0
    mismatched: list[tuple[str, str, str]] = field(default_factory=list)  # (id, teacher label, gold label)
    unexplained: list[str] = field(default_factory=list)  # ids with no usable (status ok, non-empty) reason
    kept_mismatched: bool = False
    kept_unexplained: bool = False

    def text(self) -> str:
        what = "CoT records" if self.layout == INLINE else f"records, the label then the reason as a second turn " \
                                                            f"(after {REASON_QUESTION})"
        lines = [
            f"{self.written} {what} -> {self.output_file} (registered as {self.dataset_name})",
            f"  reason kept whole: {self.full}, shortened at a sentence boundary: {self.shortened}, "
            f"label only: {self.label_only}; longest "
            + ("answer" if self.layout == INLINE else "assistant turn")
            + f" {self.max_tokens_seen} tokens (incl. <|im_end|>)",
            f"  teacher label differs from gold: {len(self.mismatched)} "
            + ("(kept with the gold label)" if self.kept_mismatched else "(left out)"),
        ]
        lines += [f"    {rid}: teacher {teacher!r}, gold {gold!r}" for rid, teacher, gold in self.mismatched]
        lines.append(f"  no usable reason: {len(self.unexplained)} "
                     + ("(kept label-only)" if self.kept_unexplained else "(left out)"))
        lines += [f"    {rid}" for rid in self.unexplained[:50]]
        if len(self.unexplained) > 50:
            lines.append(f"    ... and {len(self.unexplained) - 50} more")
        return "\n".join(lines)


def _reasons_by_id(reason_files: list[str | os.PathLike]) -> dict[str, list[ReasonRecord]]:
    by_id: dict[str, list[ReasonRecord]] = {}
    for path in reason_files:
        reasons = load_reasons(path)
        if not reasons:
            raise MireInputError(problem(path, None, None, "no reasons lines (empty file)"))
        for reason in reasons:
            by_id.setdefault(reason.id, []).append(reason)
    return by_id


def merge_cot(
    dataset_file: str | os.PathLike,
    reason_files: list[str | os.PathLike],
    output_file: str | os.PathLike,
    max_output_tokens: int = MAX_NEW_TOKENS,
    keep_mismatched: bool = False,
    keep_unexplained: bool = False,
    dataset_name: str | None = None,
    count_tokens: Callable[[str], int] | None = None,
    layout: str = INLINE,
) -> MergeReport:
    """For each record the first usable reason (files in the order given, then line order) whose teacher label
    is the gold label, in `layout` (COT_LAYOUTS) and the answer format of the dataset file's prompt variant;
    everything is checked before the output is written."""
    if layout not in COT_LAYOUTS:
        raise MireInputError(f"unknown CoT layout {layout!r} (choices: {', '.join(COT_LAYOUTS)})")
    name, variant = source_variant(dataset_file, layout)
    output_file = Path(output_file)
    read_dataset_info(output_file.parent)  # a broken dataset_info.json stops us before anything is written
    by_id = _reasons_by_id(reason_files)
    # a reviewed reason (tools.convert --corrections_file, recorded in the registration) comes before the teacher's
    for rid, (label, reason) in registered_reason_fixes(file_registration(dataset_file)[1]).items():
        by_id[rid] = [ReasonRecord(rid, 0, "correction", "ok", reason=reason, label=label), *by_id.get(rid, [])]
    dataset_dir, out_dir = Path(dataset_file).parent.resolve(), output_file.parent.resolve()
    # images need not be there yet: paths are only rebased; a missing one keeps its name, relative to dataset_dir
    records = read_sharegpt(name, dataset_dir, check_images=False, train=True)
    count_tokens = count_tokens or qwen2_token_counter()
    report = MergeReport(output_file, dataset_name or output_file.stem, layout, kept_mismatched=keep_mismatched,
                         kept_unexplained=keep_unexplained)
    out_rows = []
    for record in records:
        gold = record.output
        # an augmented copy (tools.convert --augment, id ID#augK) has its source's reasons: the same label
        lines = by_id.get(record.id) or by_id.get(source_id(record.id), [])
        usable = [r for r in lines if r.status == "ok" and (r.reason or "").strip()]
        chosen = next((r for r in usable if normalize_label(r.label or "") == gold), None)
        if chosen is None and usable:
            report.mismatched.append((record.id, usable[0].label or "", gold))
            chosen = usable[0] if keep_mismatched else None
            if chosen is None:
                continue
        if chosen is None:
            report.unexplained.append(record.id)
            if not keep_unexplained:
                continue
        answer, followup, how = fit_turns(layout, chosen.reason if chosen else "", gold, count_tokens,
                                          max_output_tokens, variant)
        how = how if chosen else "label_only"
        setattr(report, how, getattr(report, how) + 1)
        turns = [answer, *(reply for _, reply in followup)]  # every assistant turn is held to the budget
        report.max_tokens_seen = max(report.max_tokens_seen, *map(count_tokens, turns))
        # paths are relative to the file's folder (LLaMA-Factory's dataset_dir)
        images = [os.path.relpath(os.path.join(dataset_dir, p), out_dir) for p in record.images]
        # the user turn as the variant wrote it for every split
        out_rows.append(chat_row(record.instruction, answer, images, system=record.system, row_id=record.id,
                                 followup=followup))
    if not out_rows:
        files = ", ".join(str(f) for f in reason_files)
        raise MireInputError(problem(dataset_file, None, None, f"no record has a usable reason with the gold label in "
                                     f"{files} (ok lines for ids of this file: "
                                     f"{sum(r.status == 'ok' for rec in records for r in by_id.get(rec.id, []))}); "
                                     "nothing to write"))
    report.written = len(out_rows)
    with OutputSet() as outs:
        outs.write_json(output_file, out_rows)
        entry = sharegpt_entry(output_file.name, variant.name)
        if layout != INLINE:  # inference reads the variant (the first exchange's); the layout says what the rows are
            entry[COT_LAYOUT_KEY] = layout
        commit_registrations(outs, out_dir, {report.dataset_name: entry})
    return report
