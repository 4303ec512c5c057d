"""Per-record (weighted) majority vote across several models' labels; an invalid answer (None) is an abstention."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TieBreak:
    """first: the tied label of the earliest file; weights: the tied label of the heaviest file (earliest on equal
    weights); model:K: the tied label of file K (1-based), else as `first`."""

    rule: str
    model: int | None = None  # 0-based file index for model:K

    @classmethod
    def parse(cls, text: str, n_files: int) -> TieBreak:
        if text in ("first", "weights"):
            return cls(text)
        if text.startswith("model:"):
            k = text.split(":", 1)[1]
            if not k.isdigit() or not 1 <= int(k) <= n_files:
                raise ValueError(f"--tie_break model:K needs K in 1..{n_files} (the position of a --prediction_file), got {k!r}")
            return cls("model", int(k) - 1)
        raise ValueError(f"--tie_break must be first, weights or model:K, got {text!r}")


def parse_weights(text: str | None, n_files: int) -> list[float]:
    if text is None:
        return [1.0] * n_files
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise ValueError(f"--weights must be comma-separated numbers, got {text!r}") from None
    if len(weights) != n_files:
        raise ValueError(f"--weights has {len(weights)} values for {n_files} prediction files")
    if any(not math.isfinite(w) or w <= 0 for w in weights):
        raise ValueError(f"--weights must all be positive, got {text!r}")
    return weights


@dataclass
class VoteResult:
    labels: list[str | None]
    votes: list[dict[str, float]]  # per record: label -> summed weight
    unanimous: list[bool]
    tied: list[bool]
    agreement: list[list[float]]  # pairwise fraction of records on which two files agree


def _winner(candidates: Sequence[str], per_file: Sequence[str | None], weights: Sequence[float], tie: TieBreak) -> str:
    if len(candidates) == 1:
        return candidates[0]
    if tie.rule == "model" and per_file[tie.model] in candidates:
        return per_file[tie.model]
    order = range(len(per_file))
    if tie.rule == "weights":
        order = sorted(order, key=lambda i: -weights[i])  # stable: equal weights keep file order
    return next(per_file[i] for i in order if per_file[i] in candidates)


def vote(label_lists: Sequence[Sequence[str | None]], weights: Sequence[float], tie: TieBreak) -> VoteResult:
    """label_lists[f][r]: file f's label for record r (aligned; None: an invalid answer, which casts no vote).
    A record no file answers validly gets None."""
    n_files = len(label_lists)
    n = len(label_lists[0])
    if any(len(labels) != n for labels in label_lists):
        raise ValueError("every file must hold one label per record")
    result = VoteResult([], [], [], [], [[1.0] * n_files for _ in range(n_files)])
    for r in range(n):
        per_file = [labels[r] for labels in label_lists]
        tally: dict[str, float] = {}
        for label, w in zip(per_file, weights, strict=True):
            if label is not None:
                tally[label] = tally.get(label, 0.0) + w
        best = max(tally.values(), default=0.0)
        candidates = [label for label, w in tally.items() if math.isclose(w, best, rel_tol=1e-9)]
        result.labels.append(_winner(candidates, per_file, weights, tie) if candidates else None)
        result.votes.append(tally)
        result.unanimous.append(len(tally) == 1 and None not in per_file)
        result.tied.append(len(candidates) > 1)
    for i in range(n_files):
        for j in range(i + 1, n_files):
            same = sum(a == b for a, b in zip(label_lists[i], label_lists[j], strict=True)) / n if n else 0.0
            result.agreement[i][j] = result.agreement[j][i] = same
    return result


def format_agreement(agreement: Sequence[Sequence[float]], names: Sequence[str]) -> str:
    lines = ["pairwise agreement (fraction of records with the same label):"]
    lines.append("      " + "".join(f"{f'#{j + 1}':>8}" for j in range(len(names))))
    for i, row in enumerate(agreement):
        lines.append(f"{f'#{i + 1}':<6}" + "".join(f"{v:>8.4f}" for v in row))
    lines += [f"  #{i + 1} = {name}" for i, name in enumerate(names)]
    return "\n".join(lines)
