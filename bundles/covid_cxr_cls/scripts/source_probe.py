"""How well the *source* of a chest X-ray can be told from the image alone: the shortcut a disease model can take.

    python bundles/covid_cxr_cls/scripts/source_probe.py [--dataset_dir DIR] [--folds 5] [--out probe.json]

A multinomial logistic regression on the wrong-input guard's image features (a histogram-equalised 32×32 thumbnail
and a 16-bin intensity histogram: no deep network, so a high score means the sources differ in plain appearance),
patient-grouped k-fold, out-of-fold predictions pooled. Reported next to the disease metrics in the model card: when
the source is this easy to predict and the classes are unevenly spread over sources, pooled disease AUCs partly
measure the source.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from medpipe.data.datalists import read_labels_csv
from medpipe.inference.input_guard import file_features


def source_probe(dataset_dir: Path, folds: int = 5, seed: int = 0) -> dict:
    items = read_labels_csv(dataset_dir, ["covid19", "pneumonia", "normal"], None)
    sources = sorted({it["source"] for it in items})
    x = np.stack([file_features(it["image"]) for it in items])
    y = np.array([sources.index(it["source"]) for it in items])
    groups = [it["group"] for it in items]
    probs = np.zeros((len(items), len(sources)))
    for train, val in StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(x, y, groups):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
        model.fit(x[train], y[train])
        probs[np.ix_(val, model.classes_)] = model.predict_proba(x[val])
    predicted = probs.argmax(1)
    per_source = {
        s: {"n": int((y == k).sum()), "auc_one_vs_rest": round(float(roc_auc_score(y == k, probs[:, k])), 4)}
        for k, s in enumerate(sources)
    }
    return {
        "n": len(items),
        "folds": folds,
        "grouped_by": "patient",
        "balanced_accuracy": round(float(balanced_accuracy_score(y, predicted)), 4),
        "chance": round(1.0 / len(sources), 4),
        "per_source": per_source,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = Path(os.environ.get("MEDPIPE_DATA", "../shared/data")) / "covid_cxr"
    parser.add_argument("--dataset_dir", type=Path, default=default)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = source_probe(args.dataset_dir, args.folds)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
