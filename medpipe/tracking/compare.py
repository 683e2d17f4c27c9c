"""`compare`: the MLflow UI's runs table of one experiment, in a terminal."""

from __future__ import annotations

import logging
import time
from typing import Any

from medpipe.errors import MedpipeError
from medpipe.tracking.client import default_tracking_uri, mlflow_client

logger = logging.getLogger(__name__)


def runs_table(experiment: str, tracking_uri: str | None = None, max_runs: int = 20) -> list[list[str]]:
    """Rows of field name + one column per run (newest first): name, status, start, duration, params, metrics."""
    uri = tracking_uri or default_tracking_uri()
    client = mlflow_client(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise MedpipeError(f"no MLflow experiment '{experiment}' at {uri}; experiments there: {names}")
    runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"], max_results=max_runs)
    if not runs:
        raise MedpipeError(f"experiment '{experiment}' at {uri} has no runs yet")

    def when(ms: int | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"

    def took(r: Any) -> str:
        return f"{(r.info.end_time - r.info.start_time) / 1000:.1f}s" if r.info.end_time else "-"

    rows = [
        ["run"] + [r.info.run_name for r in runs],
        ["status"] + [r.info.status for r in runs],
        ["created"] + [when(r.info.start_time) for r in runs],
        ["duration"] + [took(r) for r in runs],
        ["git"] + [r.data.tags.get("mlflow.source.git.commit", "-")[:12] for r in runs],
    ]
    for key in sorted({k for r in runs for k in r.data.params}):
        rows.append([f"param {key}"] + [r.data.params.get(key, "-") for r in runs])
    for key in sorted({k for r in runs for k in r.data.metrics}):
        rows.append([f"metric {key}"] + [f"{r.data.metrics[key]:.4g}" if key in r.data.metrics else "-" for r in runs])
    return rows


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)
