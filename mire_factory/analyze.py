"""The data study over teacher reasons: per-class errors, mode 2 vs 3, confusions, suspected label errors.

A "run" is one (mode, model) pair of the reasons files. The teacher is right when its parsed label equals the
record's gold label; only ok lines have an answer (refused and failed lines are counted, not judged).
"""

from __future__ import annotations

import os
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import plots
from .corrections import Correction, write_corrections
from .io import MireInputError, OutputSet
from .reasons import ReasonRecord, load_numbered_reasons
from .records import MireRecord
from .review_page import review_html
from .taxonomy import DIALOGUE_END, DIALOGUE_START, LABELS, TASKS

Run = tuple[int, str]  # (mode, model)
EXCERPT = 80


@dataclass
class Study:
    records: list[MireRecord]
    reasons: dict[Run, dict[str, ReasonRecord]]  # run -> record id -> its line

    @property
    def runs(self) -> list[Run]:
        return sorted(self.reasons)

    def answered(self, run: Run) -> list[tuple[MireRecord, ReasonRecord]]:
        lines = self.reasons[run]
        return [(r, lines[r.id]) for r in self.records if r.id in lines and lines[r.id].status == "ok"]


def run_name(run: Run, many_models: bool) -> str:
    return f"mode {run[0]} ({run[1]})" if many_models else f"mode {run[0]}"


def load_study(records: list[MireRecord], reasons_files: list[str | os.PathLike]) -> Study:
    """Joins reasons lines to records by id; a line for an unknown id, or a key twice, is an input error."""
    by_id = {r.id: r for r in records}
    reasons: dict[Run, dict[str, ReasonRecord]] = defaultdict(dict)
    problems = []
    for file in reasons_files:
        for k, line in load_numbered_reasons(file):
            if line.id not in by_id:
                problems.append(f"{file}: line {k}: record {line.id!r}: field 'id': not in the input file")
                continue
            run = (line.mode, line.model)
            if line.id in reasons[run]:
                problems.append(f"{file}: line {k}: record {line.id!r}: field 'id': a second line for mode "
                                f"{line.mode} and model {line.model!r}")
                continue
            reasons[run][line.id] = line
    if problems:
        raise MireInputError(problems)
    if not reasons:
        raise MireInputError(f"{reasons_files[0]}: no reasons lines")
    return Study(records=[r for r in records if r.has_label], reasons=dict(reasons))


def excerpt(text: str | None, limit: int = EXCERPT) -> str:
    text = " ".join((text or "").split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def accuracy(pairs: list[tuple[MireRecord, ReasonRecord]]) -> float | None:
    return sum(line.label == rec.output for rec, line in pairs) / len(pairs) if pairs else None


def pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def dialogue_excerpt(record: MireRecord, limit: int = 160) -> str:
    text = record.instruction
    if DIALOGUE_START in text:
        text = text.split(DIALOGUE_START, 1)[1].split(DIALOGUE_END, 1)[0]
    return excerpt(text, limit)


# ---------------------------------------------------------------- plots


def plot_confusion(matrix: dict[tuple[str, str], int], task: str, path: Path, title: str) -> None:
    """Gold (every label of the task) against the teacher's label (those, then any answer outside the set)."""
    labels = list(LABELS[task])
    extra = sorted({t for (_, t) in matrix if t not in labels})
    cols = labels + extra
    grid = np.zeros((len(labels), len(cols)), dtype=int)
    for (gold, teacher), n in matrix.items():
        grid[labels.index(gold), cols.index(teacher)] += n
    plots.plot_confusion_matrix(grid, labels, cols, task, path, title=title, xlabel="teacher label",
                                ylabel="gold label", key_hint="label codes: the axis key in report.md")


# ---------------------------------------------------------------- report sections


def section_overview(study: Study, names: dict[Run, str], files: list[str]) -> list[str]:
    tasks = Counter(r.task for r in study.records)
    out = ["# Teacher data study", "",
           f"{len(study.records)} labelled records ({tasks['image']} image, {tasks['dialogue']} dialogue); "
           f"reasons from {', '.join(f'`{f}`' for f in files)}.", "",
           "| run | lines | ok | refused | failed | missing | teacher accuracy (ok answers) |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    ids = {r.id for r in study.records}
    for run in study.runs:
        lines = study.reasons[run]
        st = Counter(line.status for line in lines.values())
        missing = len(ids - set(lines))
        out.append(f"| {names[run]} | {len(lines)} | {st['ok']} | {st['refused']} | {st['failed']} | {missing} | "
                   f"{pct(accuracy(study.answered(run)))} |")
    errors: Counter = Counter()
    for run in study.runs:
        for line in study.reasons[run].values():
            if line.status != "ok":
                errors[(names[run], line.status, excerpt(line.error, 70))] += 1
    if errors:
        out += ["", "Lines without an answer, by reason:", "", "| run | status | error | count |", "|---|---|---|---:|"]
        out += [f"| {run} | {status} | {error} | {n} |" for (run, status, error), n in errors.most_common(20)]
    return out + [""]


def section_per_class(study: Study, names: dict[Run, str]) -> list[str]:
    out = ["## Per class: samples and teacher errors", ""]
    for task in TASKS:
        records = [r for r in study.records if r.task == task]
        if not records:
            continue
        counts = Counter(r.output for r in records)
        out += [f"### {task} task", "", "| class | samples | " + " | ".join(f"{names[r]} acc" for r in study.runs) + " |",
                "|---|---:|" + "---:|" * len(study.runs)]
        wrong: dict[str, list[str]] = defaultdict(list)
        for label in LABELS[task]:
            if not counts[label]:
                continue
            cells = []
            for run in study.runs:
                pairs = [(rec, line) for rec, line in study.answered(run) if rec.output == label]
                cells.append(pct(accuracy(pairs)))
                for rec, line in pairs:
                    if line.label != rec.output:
                        wrong[label].append(f"| {names[run]} | `{rec.id}` | {line.label} | {excerpt(line.reason)} |")
            out.append(f"| {label} | {counts[label]} | " + " | ".join(cells) + " |")
        out.append("")
        for label in LABELS[task]:
            if wrong[label]:
                out += [f"#### {label}: samples the teacher got wrong", "", "| run | id | teacher label | reason |",
                        "|---|---|---|---|", *wrong[label], ""]
        if not any(wrong.values()):
            out += ["The teacher agreed with every gold label it answered for this task.", ""]
    return out


def section_mode_2_vs_3(study: Study, outs: OutputSet, out_dir: Path) -> list[str]:
    out = ["## Mode 2 vs mode 3: does the length limit help or hurt?", ""]
    models = sorted({model for mode, model in study.runs if mode == 2} & {model for mode, model in study.runs if mode == 3})
    if not models:
        return out + ["Needs reasons of both mode 2 and mode 3 from the same model; not given.", ""]
    for model in models:
        m2, m3 = study.reasons[(2, model)], study.reasons[(3, model)]
        both = [r for r in study.records if m2.get(r.id) and m3.get(r.id) and m2[r.id].status == m3[r.id].status == "ok"]
        acc2 = accuracy([(r, m2[r.id]) for r in both])
        acc3 = accuracy([(r, m3[r.id]) for r in both])
        len2 = [len(m2[r.id].reason or "") for r in both]
        len3 = [len(m3[r.id].reason or "") for r in both]
        out += [f"### {model}", "", f"{len(both)} samples answered in both modes.", "",
                "| mode | accuracy | reason length mean | median | p90 | max | completion tokens mean |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        for mode, acc, lengths, lines in ((2, acc2, len2, m2), (3, acc3, len3, m3)):
            if lengths:
                p90 = sorted(lengths)[int(0.9 * (len(lengths) - 1))]
                tokens = [lines[r.id].usage.get("completion_tokens", 0) for r in both]
                out.append(f"| {mode} | {pct(acc)} | {statistics.mean(lengths):.1f} | {statistics.median(lengths):.0f} "
                           f"| {p90} | {max(lengths)} | {statistics.mean(tokens):.1f} |")
        if both:
            png = f"reason_length_{_slug(model)}.png"
            plots.plot_histograms({"mode 2": len2, "mode 3": len3}, outs.path(out_dir / png),
                                  title=f"reason length, {model}", xlabel="reason length (characters)",
                                  ylabel="answers")
            out += ["", f"![reason length]({png})", ""]
        flips_hurt = [r for r in both if m2[r.id].label == r.output != m3[r.id].label]
        flips_help = [r for r in both if m3[r.id].label == r.output != m2[r.id].label]
        out += [f"Flipped: {len(flips_hurt)} right in mode 2 but wrong in mode 3; {len(flips_help)} wrong in mode 2 "
                "but right in mode 3.", ""]
        if flips_hurt or flips_help:
            out += ["| id | gold | mode 2 label | mode 3 label | mode 3 reason |", "|---|---|---|---|---|"]
            out += [f"| `{r.id}` | {r.output} | {m2[r.id].label} | {m3[r.id].label} | {excerpt(m3[r.id].reason)} |"
                    for r in flips_hurt + flips_help]
            out.append("")
        if acc2 is None or acc3 is None:
            verdict = "no sample answered in both modes"
        elif abs(acc3 - acc2) < 0.005:
            verdict = f"the length limit neither helps nor hurts accuracy ({pct(acc2)} both)"
        else:
            verdict = (f"the length limit {'helps' if acc3 > acc2 else 'hurts'}: accuracy {pct(acc2)} -> {pct(acc3)}"
                       f" ({acc3 - acc2:+.1%})")
        if len2 and len3:
            verdict += f", reasons {statistics.mean(len2):.0f} -> {statistics.mean(len3):.0f} characters on average"
        out += [f"**Verdict ({model}):** {verdict}.", ""]
    return out


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text)[:60]


def section_confusions(study: Study, names: dict[Run, str], outs: OutputSet, out_dir: Path) -> list[str]:
    out = ["## Classes the teacher confuses", "",
           "Counts over every run given (gold label -> teacher label, ok answers only). Pairs that come up often are "
           "hints that the official definitions overlap.", ""]
    for task in TASKS:
        matrix: Counter = Counter()
        by_pair: dict[tuple[str, str], Counter] = defaultdict(Counter)
        for run in study.runs:
            for rec, line in study.answered(run):
                if rec.task == task:
                    matrix[(rec.output, line.label)] += 1
                    if line.label != rec.output:
                        by_pair[(rec.output, line.label)][names[run]] += 1
        if not matrix:
            continue
        png = f"confusion_{task}.png"
        plot_confusion(matrix, task, outs.path(out_dir / png), f"{task} task: gold vs teacher, all runs")
        out += [f"### {task} task", "", f"![confusion matrix]({png})", ""]
        pairs: Counter = Counter()
        for (gold, teacher), runs in by_pair.items():
            pairs[frozenset((gold, teacher))] += sum(runs.values())
        if pairs:
            out += ["| classes confused (either direction) | times | gold -> teacher by run |", "|---|---:|---|"]
            for pair, n in pairs.most_common(10):
                a, b = sorted(pair)
                detail = "; ".join(f"{g} -> {t}: " + ", ".join(f"{k} {v}" for k, v in by_pair[(g, t)].items())
                                   for g, t in ((a, b), (b, a)) if (g, t) in by_pair)
                out.append(f"| {a} / {b} | {n} | {detail} |")
            out.append("")
        else:
            out += ["No confusions: the teacher matched every gold label.", ""]
        invalid = Counter(t for (_, t), n in matrix.items() for _ in range(n) if t not in LABELS[task])
        if invalid:
            out += ["Answers outside the label set: " + ", ".join(f"{excerpt(t, 30)} ({n})" for t, n in invalid.items()),
                    ""]
        if plots.cjk_font() is None:  # the picture shows codes instead of the names
            codes = plots.label_codes(task, [*LABELS[task], *sorted(invalid)])
            out += ["<details><summary>axis key</summary>", "",
                    ", ".join(f"{code} = {label}" for label, code in codes.items()), "", "</details>", ""]
    return out


def suspected_label_errors(study: Study) -> list[tuple[MireRecord, list[tuple[Run, ReasonRecord]]]]:
    """Records whose gold label every run with an answer disagrees with (at least one answer)."""
    suspects = []
    for rec in study.records:
        answers = [(run, study.reasons[run][rec.id]) for run in study.runs
                   if rec.id in study.reasons[run] and study.reasons[run][rec.id].status == "ok"]
        if answers and all(line.label != rec.output for _, line in answers):
            suspects.append((rec, answers))
    return suspects


def trainset_error_text(study: Study, names: dict[Run, str]) -> str:
    suspects = suspected_label_errors(study)
    out = ["# Suspected label errors", "",
           f"{len(suspects)} of {len(study.records)} labelled samples: the teacher disagreed with the gold label in "
           f"every run that answered ({', '.join(names[r] for r in study.runs)}). Review each; relabel or keep.", ""]
    grouped: dict[str, list] = defaultdict(list)
    for rec, answers in suspects:
        grouped[rec.output].append((rec, answers))
    for task in TASKS:
        for label in LABELS[task]:
            if not grouped[label]:
                continue
            out += [f"## {label} ({task}, {len(grouped[label])})", ""]
            for rec, answers in grouped[label]:
                images = ", ".join(rec.images) or "no images"
                out += [f"### `{rec.id}`", "", f"- gold: {rec.output}", f"- images: {images}",
                        f"- answered by {len(answers)} of {len(study.runs)} runs"]
                if rec.task == "dialogue":
                    out.append(f"- dialogue: {dialogue_excerpt(rec)}")
                for run, line in answers:
                    out.append(f"- {names[run]}: **{line.label}** — {excerpt(line.reason, 200)}")
                out.append("")
    if not suspects:
        out += ["None: in every sample at least one run agreed with the gold label.", ""]
    return "\n".join(out)


def suspect_corrections(study: Study, names: dict[Run, str]) -> list[Correction]:
    """The suspects as corrections-file lines (status suspected): the proposed label is the teacher's most common
    valid one (the gold label when it gave none), the evidence each run's label and reason."""
    out = []
    for rec, answers in suspected_label_errors(study):
        valid = Counter(line.label for _, line in answers if line.label in LABELS[rec.task])
        label = valid.most_common(1)[0][0] if valid else rec.output
        evidence = [{"run": names[run], "label": line.label, "reason": line.reason} for run, line in answers]
        out.append(Correction(id=rec.id, status="suspected", gold=rec.output, label=label, by="tools.analyze",
                              why=f"the teacher disagrees with gold in {len(answers)} of {len(answers)} runs that "
                                  "answered", source="analyze", evidence=evidence))
    return out


def write_report(records: list[MireRecord], reasons_files: list[str | os.PathLike], out_dir: str | os.PathLike,
                 image_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """report.md, trainset_error.md, the PNGs, suspects.jsonl (a corrections file) and review.html (its review page,
    thumbnails from image_dir), staged and renamed into out_dir together (or none of them)."""
    out_dir = Path(out_dir)
    study = load_study(records, reasons_files)
    many_models = len({model for _, model in study.runs}) > 1
    names = {run: run_name(run, many_models) for run in study.runs}
    files = [str(f) for f in reasons_files]
    with OutputSet() as outs:
        lines = (section_overview(study, names, files) + section_per_class(study, names)
                 + section_mode_2_vs_3(study, outs, out_dir) + section_confusions(study, names, outs, out_dir))
        n_suspects = len(suspected_label_errors(study))
        lines += ["## Suspected label errors", "",
                  f"{n_suspects} samples where the teacher disagrees with the gold label in every run: see "
                  "[trainset_error.md](trainset_error.md); review them in [review.html](review.html), which saves a "
                  "corrections file for `tools.convert --corrections_file` (suspects.jsonl: the same lines, status "
                  "suspected).", ""]
        outs.write_text(out_dir / "trainset_error.md", trainset_error_text(study, names))
        outs.write_text(out_dir / "report.md", "\n".join(lines))
        suspects = suspect_corrections(study, names)
        write_corrections(outs, out_dir / "suspects.jsonl", suspects)
        outs.write_text(out_dir / "review.html", review_html(suspects, {r.id: r for r in study.records}, image_dir,
                                                             "Suspected label errors (teacher reasons)"))
        written = outs.commit()
    pngs = sorted(p for p in written if p.suffix == ".png")
    return {"report": out_dir / "report.md", "trainset_error": out_dir / "trainset_error.md",
            "suspects": out_dir / "suspects.jsonl", "review": out_dir / "review.html",
            **{p.stem: p for p in pngs}}
