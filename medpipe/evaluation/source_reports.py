"""COVID-19 chest X-ray specifics: task choice (2 or 3 classes) and source-aware reports.

Public COVID X-ray sets are confounded by source (COVID images from paper figures, normal/pneumonia images from
one hospital archive), so next to the usual metrics every report carries a per-source breakdown and a
source-controlled test: COVID-19 vs pneumonia among images of one source only (ieee8023 by default)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ignite.engine import Engine

from medpipe.errors import MedpipeError
from medpipe.evaluation.metrics import classification_report
from medpipe.evaluation.reports import ClassificationReport, _as_list

logger = logging.getLogger(__name__)

CONTROL_SOURCE = "ieee8023"  # the only source holding enough COVID-19 *and* pneumonia images




def task_spec(tasks: dict[str, dict[str, Any]], task: str) -> dict[str, Any]:
    """The {class_names, label_map} entry of the config's `tasks` for `task`; one line if it is unknown."""
    if task not in tasks:
        raise MedpipeError(f"unknown task '{task}'; choose one of {sorted(tasks)} with --task")
    return tasks[task]


def _report_entry(report: dict[str, Any], name: str) -> dict[str, Any] | None:
    return report["metrics"].get(name)


def source_controlled_auc(
    findings: Sequence[str], sources: Sequence[str], covid_prob: Sequence[float], source: str = CONTROL_SOURCE,
    n_boot: int = 1000, seed: int = 0,
) -> dict[str, Any]:
    """ROC-AUC of P(covid19) for covid19 vs pneumonia images of one `source` only, with a bootstrap 95 % CI.

    Holding the source fixed removes the easiest shortcut (recognising where an image came from); what is left
    is closer to the clinical question, though still on figure-quality images.
    """
    pairs = enumerate(zip(findings, sources, strict=True))
    keep = [i for i, (f, s) in pairs if s == source and f in ("covid19", "pneumonia")]
    is_covid = np.array([findings[i] == "covid19" for i in keep], dtype=int)
    out: dict[str, Any] = {
        "description": f"covid19 vs pneumonia, {source} images only, score = P(covid19)",
        "source": source, "n_covid19": int(is_covid.sum()), "n_pneumonia": int(len(keep) - is_covid.sum()),
    }  # fmt: skip
    if not keep or is_covid.min() == is_covid.max():
        out["roc_auc"] = {"value": None, "ci95": None}  # one class only: AUC undefined, not made up
        return out
    p = np.clip(np.array([covid_prob[i] for i in keep], dtype=float), 0.0, 1.0)
    report = classification_report(is_covid, np.stack([1 - p, p], axis=1), ["pneumonia", "covid19"], n_boot, seed)
    out["roc_auc"] = _report_entry(report, "roc_auc")
    return out


def per_source_reports(
    labels: Sequence[int], probs: np.ndarray, sources: Sequence[str], class_names: Sequence[str],
    n_boot: int = 1000, seed: int = 0,
) -> dict[str, Any]:
    """classification_report restricted to each source; metrics a source cannot define (one class) are null."""
    out: dict[str, Any] = {}
    labels_arr, sources_arr = np.asarray(labels, dtype=int), np.asarray(sources)
    for source in sorted(set(sources)):
        idx = np.flatnonzero(sources_arr == source)
        out[source] = classification_report(labels_arr[idx], probs[idx], class_names, n_boot, seed)
    return out


def source_aware_report(
    labels: Sequence[int], probs: Sequence[Sequence[float]] | np.ndarray, sources: Sequence[str],
    findings: Sequence[str], class_names: Sequence[str], n_boot: int = 1000, seed: int = 0,
) -> dict[str, Any]:
    """classification_report + `per_source` + `source_controlled` (needs a 'covid19' class)."""
    probs_arr = np.asarray(probs, dtype=float)
    if "covid19" not in class_names:
        raise MedpipeError(f"source-aware report needs a 'covid19' class, got {list(class_names)}")
    report = classification_report(labels, probs_arr, class_names, n_boot, seed)
    report["per_source"] = per_source_reports(labels, probs_arr, sources, class_names, n_boot, seed)
    covid_prob = probs_arr[:, list(class_names).index("covid19")]
    report["source_controlled"] = source_controlled_auc(findings, sources, covid_prob, CONTROL_SOURCE, n_boot, seed)
    return report


class SourceAwareReport(ClassificationReport):
    """ClassificationReport whose files also carry each case's source and CSV label (finding).

    predictions.csv gains `source` and `finding` columns; metrics.json gains `per_source` and
    `source_controlled` (see source_aware_report). Items without a source (plain inference) count as 'unknown'.
    """

    def __init__(self, *args: Any, source_key: str = "source", finding_key: str = "finding", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.source_key, self.finding_key = source_key, finding_key
        self.meta: list[tuple[str, str]] = []

    def _reset(self, engine: Engine) -> None:
        super()._reset(engine)
        self.meta = []

    def _collect(self, engine: Engine) -> None:
        super()._collect(engine)
        for item in _as_list(engine.state.batch):
            self.meta.append((str(item.get(self.source_key, "unknown")), str(item.get(self.finding_key, ""))))

    def _extra_header(self) -> list[str]:
        return ["source", "finding"]

    def _extra_cells(self, row: int) -> list[str]:
        return list(self.meta[row])

    def _report(self) -> dict[str, Any]:
        return source_aware_report(
            [r[2] for r in self.records], np.stack([r[1] for r in self.records]), [m[0] for m in self.meta],
            [m[1] for m in self.meta], self.class_names, self.n_boot, self.seed,
        )  # fmt: skip

    def _summary(self, report: dict[str, Any]) -> str:
        macro = report["metrics"].get("macro_roc_auc", report["metrics"].get("roc_auc"))
        return f"macro/ROC-AUC {macro}, source-controlled AUC {report['source_controlled']['roc_auc']}"


def pooled_source_report(prediction_files: Iterable[str | Path], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """source_aware_report over the out-of-fold predictions.csv files of a cross-validation, pooled.

    Pooling the held-out folds gives every image one out-of-fold prediction, so small subsets (ieee8023
    pneumonia: ~60 images) get a usable CI that a single fold (~12 images) cannot.
    """
    from medpipe.evaluation.cv import read_predictions

    rows, class_names = read_predictions(list(prediction_files))
    labels = [class_names.index(r["label"]) for r in rows]
    probs = np.array([[float(r[f"prob_{c}"]) for c in class_names] for r in rows])
    report = source_aware_report(
        labels, probs, [r["source"] for r in rows], [r["finding"] for r in rows], class_names, n_boot, seed
    )
    return {"pooled_out_of_fold": True, **report}
