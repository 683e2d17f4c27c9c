"""Ignite handlers that turn an evaluator run into files: predictions.csv and metrics.json.

The files of one evaluation are written as a pair (write_report_files): the data files first, metrics.json last and
stamped with their sha256, so a job killed in between cannot leave new predictions beside an older metrics.json
that a reader would accept (check_report_files)."""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from medpipe.errors import MedpipeError
from medpipe.evaluation.calibration import report_columns
from medpipe.evaluation.metrics import classification_report
from medpipe.files import atomic_write_text, sha256_file

logger = logging.getLogger(__name__)

FILES_SHA256 = "files_sha256"  # metrics.json key: {data file name: sha256} of the files it was computed from


def write_report_files(
    output_dir: str | Path, data_files: Mapping[str, str], metrics: Mapping[str, Any] | None = None,
    written: Sequence[str] = (),
) -> None:
    """Write `data_files` ({name: text}) into `output_dir`, then `metrics` as metrics.json, last, with their sha256
    (and that of the `written` files already there, e.g. binary ones).

    Each file is atomic; writing metrics.json last and stamping it makes the pair checkable (check_report_files)."""
    output_dir = Path(output_dir)
    for name, text in data_files.items():
        atomic_write_text(output_dir / name, text)
    if metrics is not None:
        stamp = {name: sha256_file(output_dir / name) for name in [*data_files, *written]}
        atomic_write_text(output_dir / "metrics.json", json.dumps({**metrics, FILES_SHA256: stamp}, indent=2))


def check_report_files(folder: str | Path) -> dict[str, Any]:
    """metrics.json of `folder`, after checking that the data files it was computed from are the ones beside it.

    MedpipeError in one line otherwise (a job killed between writing them, or files copied from another run).
    A metrics.json without the stamp (written before it existed) is accepted as it is."""
    folder = Path(folder)
    metrics_file = folder / "metrics.json"
    try:
        report = json.loads(metrics_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MedpipeError(f"cannot read '{metrics_file}' ({exc}): evaluate this fold again") from exc
    for name, digest in (report.get(FILES_SHA256) or {}).items():
        data_file = folder / name
        if not data_file.is_file() or sha256_file(data_file) != digest:
            raise MedpipeError(
                f"'{data_file}' is not the file '{metrics_file}' was computed from (a job killed between writing "
                "them, or files from another run): evaluate this fold again"
            )
    return report


def _as_list(x: Any) -> list:
    return x if isinstance(x, list) else [x]


def predictions_csv(
    paths: Sequence[str],
    probs: Sequence[Sequence[float]] | np.ndarray,
    class_names: Sequence[str],
    labels: Sequence[int] | None = None,
    extra_header: Sequence[str] = (),
    extra_cells: Sequence[Sequence[str]] | None = None,
) -> str:
    """predictions.csv text: path, prob_<class>…, predicted (argmax), extra columns, then label when known."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    header = ["path"] + [f"prob_{c}" for c in class_names] + ["predicted"] + list(extra_header)
    writer.writerow(header + (["label"] if labels is not None else []))
    for i, (path, p) in enumerate(zip(paths, probs, strict=True)):
        row = [path] + [f"{v:.6f}" for v in p] + [class_names[int(np.argmax(p))]]
        row += list(extra_cells[i]) if extra_cells is not None else []
        writer.writerow(row + ([class_names[labels[i]]] if labels is not None else []))
    return buf.getvalue()


def _csv_line(cells: Sequence[str]) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerow(cells)  # the dialect predictions_csv writes with
    return buf.getvalue()


def split_predictions(text: str) -> tuple[str, dict[str, str]]:
    """predictions.csv text as (its header line, {path: its row's line}): the parts a run in pieces merges."""
    rows = list(csv.reader(io.StringIO(text, newline="")))
    if not rows:
        raise MedpipeError("predictions.csv is empty: it has no header")
    return _csv_line(rows[0]), {row[0]: _csv_line(row) for row in rows[1:]}


def join_predictions(header: str, rows: Sequence[str]) -> str:
    """predictions.csv text from split_predictions' parts, rows in input order: what one run over all inputs writes."""
    return header + "".join(rows)


def _probabilities(pred: torch.Tensor) -> np.ndarray:
    """(C,) class probabilities from a post-processed prediction; one sigmoid output means P(class 1)."""
    p = torch.as_tensor(pred).detach().float().cpu().reshape(-1).numpy()
    return np.array([1 - p[0], p[0]]) if p.size == 1 else p


class EpochCollector:
    """Base of evaluator handlers that keep one record per evaluated item over an epoch and write them at its end.

    Subclasses turn one (post-processed output, batch item) pair into a record (`_record`) and write the epoch's
    `self.records` (`_write`).
    """

    def __init__(
        self, output_dir: str, n_boot: int = 1000, seed: int = 0, info: dict[str, Any] | None = None,
        pred_key: str = "pred", label_key: str = "label", path_key: str = "path",
    ) -> None:  # fmt: skip
        """output_dir: where the files go; n_boot / seed: the bootstrap CIs; info: fields copied into metrics.json;
        *_key: where the evaluator output and batch item hold the prediction, label and image path."""
        self.output_dir = Path(output_dir)
        self.n_boot, self.seed, self.info = n_boot, seed, info or {}
        self.pred_key, self.label_key, self.path_key = pred_key, label_key, path_key
        self.records: list[Any] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.records = []

    def _collect(self, engine: Engine) -> None:
        for out, item in zip(_as_list(engine.state.output), _as_list(engine.state.batch), strict=True):
            self.records.append(self._record(out, item))

    def _record(self, out: Mapping[str, Any], item: Mapping[str, Any]) -> Any:
        raise NotImplementedError

    def _write(self, engine: Engine) -> None:
        raise NotImplementedError


class ClassificationReport(EpochCollector):
    """Collect per-case probabilities over one evaluator epoch and write them out.

    Always writes `<output_dir>/predictions.csv` (path, one probability column per class, predicted class, the
    per-case `columns` (uncertainty, flag; the input guard's verdict when given), and the true class when labels
    are known); with labels also `<output_dir>/metrics.json` (medpipe.metrics).
    """

    def __init__(
        self, output_dir: str, class_names: Sequence[str], with_labels: bool = True,
        columns: Sequence[Any] | None = None, **common: Any,
    ) -> None:  # fmt: skip
        """columns: per-case column sources (`header`, `cells(path, probabilities)`) written after `predicted`;
        default the uncertainty columns (medpipe.evaluation.calibration.report_columns). common: EpochCollector's."""
        super().__init__(output_dir, **common)
        self.class_names = list(class_names)
        self.columns = report_columns() if columns is None else [c for c in columns if c is not None]
        self.with_labels = with_labels
        self.records: list[tuple[str, np.ndarray, int | None]] = []  # (path, probabilities, label or None)

    def _reset(self, engine: Engine) -> None:
        super()._reset(engine)
        for column in self.columns:
            if hasattr(column, "reset"):
                column.reset()

    def _collect(self, engine: Engine) -> None:
        before = len(self.records)
        super()._collect(engine)
        for column in self.columns:  # columns that read the scoring inferer's state of this batch (member_spread)
            if hasattr(column, "batch_scored"):
                column.batch_scored(len(self.records) - before)

    def _record(self, out: Mapping[str, Any], item: Mapping[str, Any]) -> tuple[str, np.ndarray, int | None]:
        label = None
        if self.with_labels:
            label = int(round(float(torch.as_tensor(out[self.label_key]).reshape(-1)[0])))
        return str(item[self.path_key]), _probabilities(out[self.pred_key]), label

    def _predictions_csv(self) -> str:
        paths, probs = [r[0] for r in self.records], [r[1] for r in self.records]
        labels = [r[2] for r in self.records] if self.with_labels else None
        extra = [self._extra_cells(i) + [cell for c in self.columns for cell in c.cells(paths[i], probs[i])]
                 for i in range(len(self.records))]  # fmt: skip
        header = self._extra_header() + [name for c in self.columns for name in c.header]
        return predictions_csv(paths, probs, self.class_names, labels, header, extra)

    def _extra_header(self) -> list[str]:
        """Columns a subclass adds after `predicted` (none here)."""
        return []

    def _extra_cells(self, row: int) -> list[str]:
        return []

    def _report(self) -> dict[str, Any]:
        """The metrics of the collected cases (a subclass may add its own, e.g. per-source figures)."""
        labels = [r[2] for r in self.records]
        return classification_report(labels, [r[1] for r in self.records], self.class_names, self.n_boot, self.seed)

    def _summary(self, report: dict[str, Any]) -> str:
        acc, auc = report["metrics"]["accuracy"]["value"], report["metrics"].get("roc_auc", {}).get("value")
        return f"accuracy {acc}, ROC-AUC {auc} on {report['n']} cases"

    def _write(self, engine: Engine) -> None:
        """predictions.csv, then (with labels) metrics.json last, stamped with the predictions' hash: a pair."""
        files = {"predictions.csv": self._predictions_csv()}
        report = {**self.info, **self._report()} if self.with_labels else None
        write_report_files(self.output_dir, files, report)
        logger.info(f"wrote {len(self.records)} predictions to {self.output_dir / 'predictions.csv'}")
        if report is not None:
            logger.info(f"{self._summary(report)}: {self.output_dir / 'metrics.json'}")
