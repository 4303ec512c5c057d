"""Does tools.kfold find label errors? Plant known ones and count what it finds (issue 19, item 5's measurement).

The public set's true label errors are unknown, so the check is on planted ones: a seeded share of one task's
train records gets another label of the same task (uniformly chosen), tools.kfold runs on that file, and its
suspects are scored against the plants.

python benchmarks/quality/label_noise.py inject --train_file T.json --out DIR [--task dialogue] [--rate 0.1]
    [--seed 0] [--only_task]
-> DIR/train_noisy.json (MIRE records as in T, the planted ones relabelled; --only_task: that task's records only,
   since the harness's random vision tower cannot tell image scenes apart, and neither can its out-of-fold models),
   DIR/plants.json ([{id, gold, planted}])
python benchmarks/quality/label_noise.py score --plants DIR/plants.json --suspects KFOLD/suspects.jsonl
    [--out R.json]
-> precision and recall of the suspects against the plants, how many suspects propose the original label back
   (the fix a reviewer would accept), and the suspects among unplanted records (label errors of the data itself, or
   the models' mistakes: for people to judge).
python benchmarks/quality/label_noise.py review --plants DIR/plants.json --suspects KFOLD/suspects.jsonl
    --out C.jsonl [--reviewer proposals|oracle]
-> the corrections file a reviewer of the suspects would save (review.html's accepted and rejected lines), for
   `tools.convert --corrections_file` on DIR/train_noisy.json: the F1 of training on it against training on the
   noisy file is what the out-of-fold check is worth. `proposals`: a reviewer who accepts a suspect whose proposed
   label is the right one and rejects every other suspect; `oracle`: one who also relabels every suspected plant to
   its right label (the most a review of these suspects can fix). Unplanted suspects are rejected (the public
   labels taken as right).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mire_factory.io import MireInputError, OutputSet, problem, read_json, run_cli, write_json_atomic  # noqa: E402


def inject(train_file: Path, task: str, rate: float, seed: int, only_task: bool) -> tuple[list[dict], list[dict]]:
    """(records, plants): round(rate x the task's records) of them relabelled, chosen and relabelled by `seed`."""
    from mire_factory.records import load_records
    from mire_factory.taxonomy import LABELS

    raw = read_json(train_file)
    records = load_records(train_file, kind="train", decode_images=False)  # checked: bad input is one line
    task_ids = [r.id for r in records if r.task == task]
    rng = random.Random(seed)
    chosen = set(rng.sample(task_ids, round(rate * len(task_ids))))
    gold = {r.id: r.output for r in records}
    plants, out = [], []
    for item, record in zip(raw, records, strict=True):
        if only_task and record.task != task:
            continue
        item = dict(item)
        if record.id in chosen:
            planted = rng.choice([label for label in LABELS[task] if label != gold[record.id]])
            plants.append({"id": record.id, "gold": gold[record.id], "planted": planted})
            item["output"] = planted
        out.append(item)
    return out, plants


def score(plants: list[dict], suspects: list[dict]) -> dict:
    planted = {p["id"]: p for p in plants}
    found = [s for s in suspects if s["id"] in planted]
    others = [s for s in suspects if s["id"] not in planted]
    restores = [s for s in found if s["label"] == planted[s["id"]]["gold"]]
    return {
        "plants": len(planted), "suspects": len(suspects), "planted_found": len(found),
        "recall": round(len(found) / len(planted), 4) if planted else None,
        "precision": round(len(found) / len(suspects), 4) if suspects else None,
        "found_proposing_the_original_label": len(restores),
        "unplanted_suspects": [{"id": s["id"], "gold": s["gold"], "proposed": s["label"]} for s in others],
        "missed": sorted(set(planted) - {s["id"] for s in found}),
    }


def review(plants: list[dict], suspects: list[dict], reviewer: str) -> list[dict]:
    """Corrections lines (accepted or rejected) for every suspect, as `reviewer` would judge them."""
    planted = {p["id"]: p for p in plants}
    out = []
    for s in suspects:
        plant = planted.get(s["id"])
        right = plant["gold"] if plant else s["gold"]
        fix = plant is not None and (reviewer == "oracle" or s["label"] == right)
        out.append({**s, "status": "accepted" if fix else "rejected", "label": right if fix else s["label"],
                    "by": f"label_noise.py review ({reviewer})"})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("inject", help="plant label errors")
    i.add_argument("--train_file", type=Path, required=True)
    i.add_argument("--out", type=Path, required=True)
    i.add_argument("--task", choices=["image", "dialogue"], default="dialogue")
    i.add_argument("--rate", type=float, default=0.1, help="share of the task's records relabelled")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--only_task", action="store_true", help="write only the task's records")
    s = sub.add_parser("score", help="suspects against the plants")
    s.add_argument("--plants", type=Path, required=True)
    s.add_argument("--suspects", type=Path, required=True, help="tools.kfold's suspects.jsonl")
    s.add_argument("--out", type=Path, help="write the score here too (JSON)")
    r = sub.add_parser("review", help="the corrections file a reviewer of the suspects would save")
    r.add_argument("--plants", type=Path, required=True)
    r.add_argument("--suspects", type=Path, required=True, help="tools.kfold's suspects.jsonl")
    r.add_argument("--out", type=Path, required=True, help="the corrections file (JSON lines)")
    r.add_argument("--reviewer", choices=["proposals", "oracle"], default="proposals")
    args = p.parse_args(argv)
    if args.command == "inject":
        if not 0 < args.rate < 1:
            raise MireInputError(f"--rate: expected a share between 0 and 1, got {args.rate}")
        records, plants = inject(args.train_file, args.task, args.rate, args.seed, args.only_task)
        with OutputSet() as outs:
            outs.write_json(args.out / "train_noisy.json", records)
            outs.write_json(args.out / "plants.json", plants)
        print(f"planted {len(plants)} label errors among {len(records)} records: {args.out / 'train_noisy.json'}")
        return 0
    from mire_factory.corrections import read_corrections

    for path in (args.plants, args.suspects):
        if not path.is_file():
            raise MireInputError(problem(path, None, None, "file not found"))
    # tools.kfold writes an empty suspects file when every out-of-fold label agrees with gold (or none parses);
    # read_corrections refuses an empty corrections file, which is right for tools.convert, not here
    empty = not args.suspects.read_text(encoding="utf-8").strip()
    plants = read_json(args.plants)
    for n, plant in enumerate(plants if isinstance(plants, list) else [None]):
        if not (isinstance(plant, dict) and all(isinstance(plant.get(k), str) for k in ("id", "gold", "planted"))):
            raise MireInputError(problem(args.plants, n, None, "expected a list of {id, gold, planted} (label_noise.py "
                                                               "inject writes it)"))
    suspects = [] if empty else [c.to_dict() for c in read_corrections(args.suspects)]
    if args.command == "review":
        if not suspects:
            raise MireInputError(problem(args.suspects, None, None, "no suspects to review (empty file)"))
        lines = review(plants, suspects, args.reviewer)
        with OutputSet() as outs:
            outs.write_jsonl(args.out, lines)
        accepted = sum(line["status"] == "accepted" for line in lines)
        print(f"{accepted} of {len(lines)} suspects accepted ({args.reviewer}), the rest rejected: {args.out}")
        return 0
    result = score(plants, suspects)
    if args.out:
        write_json_atomic(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "unplanted_suspects"}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    run_cli(main)
