"""The classical anchor of the quality harness: TF-IDF character n-grams and a linear classifier (scikit-learn),
trained on the train split's text and scored on the test split with the official metric (mire_factory.scoring).

    python benchmarks/quality/tfidf_anchor.py --train_file train.json --test_file test.json
        [--info_file ocr.jsonl] [--json_file anchor.json]

- Dialogues: the customer's turns of the dialogue (the label is the customer's intent; the agent's turns are largely
  templated replies shared across intents, and the fixed preamble and label list carry no signal). The whole
  dialogue between the START/END markers is scored too, as `dialogue_whole` (a sensitivity figure, not the anchor).
- Image scenes: the screenshot text of the record's images, from `--info_file`; without one the task is reported
  as unavailable (an image record's instruction is the same fixed text for every scene).

`--info_file` is an info file of tools.extract_info (JSON lines, one image per line: "image" the file name as in the
record's image list, "text" its text, ...; mire_factory/image_info.py describes and reads it).

The n-gram range and the regularisation C are chosen by 4-fold stratified cross-validation repeated 5 times
(weighted F1) on the train split only; the test split is scored once.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mire_factory import image_info  # noqa: E402
from mire_factory.io import run_cli, write_json_atomic  # noqa: E402
from mire_factory.records import load_records  # noqa: E402
from mire_factory.taxonomy import AGENT_PREFIX, DIALOGUE_END, DIALOGUE_START, USER_PREFIX  # noqa: E402

C_GRID = (0.1, 0.3, 1.0, 3.0, 10.0)
NGRAM_GRID = ((1, 2), (1, 3))
CV_REPEATS = 5  # one 4-fold split of ~140 dialogues is a noisy judge: C flipped between 0.3 and 3 with its seed


def read_info_file(path: str | Path) -> dict[str, str]:
    """image file name -> its text, from an info file of tools.extract_info (mire_factory.image_info reads and checks
    it; rows that are not ok carry no text and are left out)."""
    return {Path(name).name: text for name, text in image_info.read_info_file(path).by_name.items()}


def dialogue_text(instruction: str) -> str:
    start, end = instruction.find(DIALOGUE_START), instruction.find(DIALOGUE_END)
    return instruction[start + len(DIALOGUE_START): end].strip() if 0 <= start < end else instruction


def user_turns(instruction: str) -> str:
    """The customer's turns only (a turn runs until the next line that opens a turn)."""
    kept, keep = [], False
    for line in dialogue_text(instruction).splitlines():
        if line.startswith((USER_PREFIX, AGENT_PREFIX)):
            keep = line.startswith(USER_PREFIX)
            line = line[len(USER_PREFIX):] if keep else line
        if keep:
            kept.append(line)
    return "\n".join(kept)


def record_text(record, info: dict[str, str] | None, view: str = "user_turns") -> str | None:
    if record.task == "dialogue":
        return user_turns(record.instruction) if view == "user_turns" else dialogue_text(record.instruction)
    if info is None:
        return None
    return "\n".join(info.get(Path(name).name, "") for name in record.images)


def make_pipeline():
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import make_pipeline as sk_pipeline
    from sklearn.svm import LinearSVC

    return sk_pipeline(TfidfVectorizer(analyzer="char", sublinear_tf=True), LinearSVC(class_weight="balanced"))


def fit(texts: list[str], labels: list[str], seed: int = 0) -> tuple:
    """The pipeline with n-grams and C chosen by repeated 4-fold stratified CV (weighted F1) on these texts only;
    returns (model, settings, cv F1). Too few records for folds (no class twice): the grids' middle, no CV."""
    from collections import Counter

    from sklearn.model_selection import GridSearchCV, RepeatedStratifiedKFold

    folds = min(4, max(Counter(labels).values()))
    if folds < 2:
        model = make_pipeline().set_params(linearsvc__C=1.0, tfidfvectorizer__ngram_range=NGRAM_GRID[0])
        return model.fit(texts, labels), {"C": 1.0, "ngram_range": list(NGRAM_GRID[0])}, float("nan")
    search = GridSearchCV(make_pipeline(), {"linearsvc__C": list(C_GRID),
                                            "tfidfvectorizer__ngram_range": list(NGRAM_GRID)},
                          scoring="f1_weighted",
                          cv=RepeatedStratifiedKFold(n_splits=folds, n_repeats=CV_REPEATS, random_state=seed))
    with warnings.catch_warnings():  # classes with fewer records than folds: sklearn warns, the folds stay valid
        warnings.simplefilter("ignore", UserWarning)
        search.fit(texts, labels)
    settings = {"C": search.best_params_["linearsvc__C"],
                "ngram_range": list(search.best_params_["tfidfvectorizer__ngram_range"])}
    return search.best_estimator_, settings, float(search.best_score_)


def score_view(train, test, info, view: str, seed: int) -> tuple[dict, list[str]]:
    from mire_factory.scoring import score

    task = test[0].task
    model, settings, cv_f1 = fit([record_text(r, info, view) for r in train], [r.output for r in train], seed)
    predicted = list(model.predict([record_text(r, info, view) for r in test]))
    part = score([r.output for r in test], predicted, [task] * len(test))[task]
    return {**part, "view": view, **settings, "train_cv_f1": None if cv_f1 != cv_f1 else round(cv_f1, 4),
            "train": len(train),
            "test": len(test)}, predicted


def run_anchor(train_file, test_file, info_file=None, seed: int = 0) -> dict:
    """{"image": scores | {"unavailable": why}, "dialogue": scores, "dialogue_whole": scores, "overall_of_available_
    tasks", "settings"}; scores as tools.cal_acc computes them (the official weighted F1 per task)."""
    from mire_factory.scoring import score

    info = read_info_file(info_file) if info_file else None
    train = load_records(train_file, None, kind="train")
    test = load_records(test_file, None, kind="train")
    result: dict = {"settings": {"features": "TF-IDF character n-grams, sublinear tf",
                                 "classifier": "LinearSVC(class_weight=balanced)", "C_grid": list(C_GRID),
                                 "ngram_grid": [list(g) for g in NGRAM_GRID],
                                 "selection": f"4-fold stratified CV x {CV_REPEATS} on the train split (weighted F1)",
                                 "seed": seed, "info_file": str(info_file) if info_file else None}}
    golds, preds, tasks = [], [], []
    for task in ("image", "dialogue"):
        tr = [r for r in train if r.task == task]
        te = [r for r in test if r.task == task]
        if not te:
            continue
        if task == "image" and info is None:
            result[task] = {"unavailable": "no --info_file with screenshot text (the instruction is the same "
                                           "for every image record)"}
            continue
        result[task], predicted = score_view(tr, te, info, "user_turns" if task == "dialogue" else "info_text", seed)
        golds += [r.output for r in te]
        preds += predicted
        tasks += [task] * len(te)
        if task == "dialogue":
            result["dialogue_whole"], _ = score_view(tr, te, info, "dialogue", seed)
    if golds:
        result["overall_of_available_tasks"] = score(golds, preds, tasks)["overall"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_file", required=True)
    parser.add_argument("--test_file", required=True, help="MIRE json with gold labels")
    parser.add_argument("--info_file", help="JSON lines {\"image\": name, \"text\": screenshot text}")
    parser.add_argument("--json_file", help="write the scores here")
    parser.add_argument("--seed", type=int, default=0, help="the CV folds' shuffle")
    args = parser.parse_args(argv)
    result = run_anchor(args.train_file, args.test_file, args.info_file, args.seed)
    for task in ("image", "dialogue", "dialogue_whole"):
        part = result.get(task)
        if part is None:
            continue
        if "unavailable" in part:
            print(f"{task:14s} unavailable: {part['unavailable']}")
        else:
            print(f"{task:14s} weighted F1 {part['f1']:.4f}  accuracy {part['accuracy']:.4f}  ({part['view']}, "
                  f"n-grams {part['ngram_range']}, C={part['C']}; train CV F1 {part['train_cv_f1']}; "
                  f"{part['train']} train / {part['test']} test)")
    if args.json_file:
        write_json_atomic(args.json_file, result)
        print(f"wrote {args.json_file}")
    return 0


if __name__ == "__main__":
    run_cli(main)
