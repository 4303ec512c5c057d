"""Invalid answers: left invalid (the default) or filled with a label (--fill), scored by tools.cal_acc on real records.

    python -m benchmarks.answers [--test_file ../shared/mire_dev/train_dev.json] [--seed 0] [--wrong 0.15]
        [--empty 0.06] [--near 0.05] [--garbage 0.03] [--out answers.json]

Predictions are the gold labels, corrupted with a seed in documented ways: `wrong` (another label of the record's
task, a model's ordinary mistakes, so that the base F1 looks like a real model's), `empty` (""), `near` (a near miss:
one character replaced, dropped or added, the label cut short, or wrapped in words) and `garbage` (a refusal, random
characters from the label definitions, or a label of the other task). Each scenario is scored twice through
tools.cal_acc: with --raw (the official tool: strings as written), by default (near misses fixed, the rest
invalid) and with --fill (every answer gets a label).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mire_factory.taxonomy import DEFINITIONS, LABELS, RETIRED_IMAGE_LABELS, detect_task  # noqa: E402
from tools import cal_acc  # noqa: E402

FILLERS = "的了是在有和不这个品页面物流商图"
REFUSALS = ("我不知道", "无法判断", "抱歉，我无法回答这个问题", "unknown", "None", "其他")


def near_miss(label: str, rng: random.Random) -> str:
    kind = rng.choice(["replace", "drop", "add", "cut", "wrap"])
    k = rng.randrange(len(label))
    if kind == "replace":
        return label[:k] + rng.choice(FILLERS.replace(label[k], "")) + label[k + 1:]
    if kind == "drop" and len(label) > 2:
        return label[:k] + label[k + 1:]
    if kind == "add":
        return label[:k] + rng.choice(FILLERS) + label[k:]
    if kind == "cut" and len(label) > 3:
        return label[: rng.randint(2, len(label) - 1)]
    return rng.choice(["我认为是", "分类结果：", "应该属于"]) + label + rng.choice(["", "。", "吧"])


def garbage(task: str, rng: random.Random) -> str:
    kind = rng.choice(["refusal", "chars", "other_task"])
    if kind == "refusal":
        return rng.choice(REFUSALS)
    if kind == "chars":
        text = "".join(DEFINITIONS[task].values())
        return "".join(rng.choice(text) for _ in range(rng.randint(3, 8)))
    return rng.choice(LABELS["dialogue" if task == "image" else "image"])


def corrupt(records: list[dict], rates: dict[str, float], seed: int) -> tuple[list[dict], dict[str, int]]:
    """One prediction row per record; each record is corrupted in at most one way, drawn in the order of `rates`."""
    rng = random.Random(seed)
    rows, counts = [], {kind: 0 for kind in rates}
    for r in records:
        task = detect_task(r["instruction"])
        gold, predict = r["output"], r["output"]
        draw, edge = rng.random(), 0.0
        for kind, rate in rates.items():
            edge += rate
            if draw < edge:
                counts[kind] += 1
                if kind == "wrong":
                    predict = rng.choice([x for x in LABELS[task] if x != gold and x not in RETIRED_IMAGE_LABELS])
                elif kind == "empty":
                    predict = ""
                elif kind == "near":
                    predict = near_miss(gold, rng)
                else:
                    predict = garbage(task, rng)
                break
        rows.append({"id": r["id"], "predict": predict})
    return rows, counts


def cal_acc_f1(test_file: Path, rows: list[dict], flag: str | None, tmp: Path) -> dict:
    preds, metrics = tmp / "p.jsonl", tmp / "m.json"
    preds.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    with contextlib.redirect_stdout(io.StringIO()):
        code = cal_acc.main(["--test_file", str(test_file), "--prediction_file", str(preds), "--json_file",
                             str(metrics)] + ([flag] if flag else []))
    if code:
        raise SystemExit(f"tools.cal_acc exited {code}")
    result = json.loads(metrics.read_text(encoding="utf-8"))
    return {key: round(result[key]["f1"], 4) for key in ("overall", "image", "dialogue")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test_file", default=str(REPO.parent / "shared" / "mire_dev" / "train_dev.json"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wrong", type=float, default=0.15)
    parser.add_argument("--empty", type=float, default=0.06)
    parser.add_argument("--near", type=float, default=0.05)
    parser.add_argument("--garbage", type=float, default=0.03)
    parser.add_argument("--out", help="write the table as JSON here")
    args = parser.parse_args(argv)
    test_file = Path(args.test_file)
    records = json.loads(test_file.read_text(encoding="utf-8"))
    scenarios = {
        "wrong only": {"wrong": args.wrong},
        "wrong + empty": {"wrong": args.wrong, "empty": args.empty},
        "wrong + near misses": {"wrong": args.wrong, "near": args.near},
        "wrong + garbage": {"wrong": args.wrong, "garbage": args.garbage},
        "all four": {"wrong": args.wrong, "empty": args.empty, "near": args.near, "garbage": args.garbage},
    }
    table = []
    print(f"{len(records)} records of {test_file}, seed {args.seed}; overall F1 (mean of the two tasks' weighted F1)")
    print(f"{'scenario':22} {'corrupted':>40}  {'--raw':>8} {'default':>8} {'--fill':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, rates in scenarios.items():
            rows, counts = corrupt(records, rates, args.seed)
            raw = cal_acc_f1(test_file, rows, "--raw", Path(tmp))
            default = cal_acc_f1(test_file, rows, None, Path(tmp))
            filled = cal_acc_f1(test_file, rows, "--fill", Path(tmp))
            table.append({"scenario": name, "corrupted": counts, "raw": raw, "default": default, "fill": filled})
            shown = ", ".join(f"{k} {v}" for k, v in counts.items())
            print(f"{name:22} {shown:>40}  {raw['overall']:8.4f} {default['overall']:8.4f} {filled['overall']:8.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps(table, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
