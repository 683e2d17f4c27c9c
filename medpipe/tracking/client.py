"""The MLflow store as medpipe uses it: the tracking URI checked before a job starts, HTTP retries bounded for
medpipe's calls, a client guard that turns a failure after start-up into one warning (training goes on), experiments
created as model-training experiments, and the run record that lets a resumed job continue its run."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from medpipe.errors import MedpipeError
from medpipe.files import atomic_write_text

logger = logging.getLogger(__name__)

DEFAULT_STORE = Path("runs") / "mlflow.db"
RUN_RECORD = "mlflow_run.json"
# MLflow 3's experiment kind; "custom_model_development" ("Machine learning" in the UI) opens on the runs table,
# an experiment without the tag may be shown as a GenAI one (the traces overview)
EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
_UNSET_KINDS = {"", "no_inferred_type", "genai_development_inferred", "custom_model_development_inferred"}
# mlflow's defaults (7 retries, backoff factor 2, 120 s timeout, obey Retry-After) let one call to a dead server
# block for minutes; these bound one failing call to `worst_case_call_s()` (~50 s); a user's own setting wins
HTTP_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "8",
    "MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER": "false",
}
_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
_OTHER_SCHEMES = ("http", "https", "databricks", "databricks-uc", "uc")
_CAUSE = re.compile(r"\[Errno -?\d+\] [^'\")]+|too many \d+ error responses|[Rr]ead timed out|timed out")
_checked_uris: set[str] = set()
# MLflow's timeout bounds each socket read, not a call: a store that trickles its answers (one byte a second) holds
# a call for as long as it likes. Each call is therefore also bounded in wall time: CALL_DEADLINE_S (None: the
# worst case of a failing call, `worst_case_call_s()`), plus time for the bytes of an artifact upload
CALL_DEADLINE_S: float | None = None
ARTIFACT_MIN_BYTES_PER_S = 256 * 1024
_ARTIFACT_CALLS = ("log_artifact", "log_artifacts")


def default_tracking_uri() -> str:
    """`$MLFLOW_TRACKING_URI`, else a sqlite file under ./runs (MLflow >= 3.13 refuses the plain file store)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path.cwd() / DEFAULT_STORE).resolve()}"


def _check_spelling(tracking_uri: str) -> None:
    """One line for a URI MLflow cannot use: unknown scheme, a server URL without a host, sqlite with two slashes,
    or a bare path / `file:` URI (the file store MLflow >= 3.13 refuses)."""
    parsed = urllib.parse.urlsplit(tracking_uri)
    scheme = parsed.scheme.lower()
    spellings = "http://HOST:PORT, https://HOST, sqlite:////abs/path/mlflow.db or postgresql://USER@HOST/DB"
    if scheme in ("", "file") and "://" not in tracking_uri.removeprefix("file:"):
        path = Path(urllib.parse.unquote(parsed.path) if scheme == "file" else tracking_uri).resolve()
        raise MedpipeError(
            f"tracking_uri '{tracking_uri}' is a file store, which MLflow >= 3.13 refuses; "
            f"use sqlite:///{path}/mlflow.db"
        )
    if scheme in ("http", "https") and not parsed.hostname:
        raise MedpipeError(f"tracking_uri '{tracking_uri}' names no server; spell it {scheme}://HOST:PORT")
    if scheme == "sqlite" and not tracking_uri.startswith("sqlite:///"):
        raise MedpipeError(f"tracking_uri '{tracking_uri}': a sqlite URI has three slashes, sqlite:///path/mlflow.db")
    if scheme.split("+")[0] not in _DB_SCHEMES + _OTHER_SCHEMES + _plugin_schemes():
        raise MedpipeError(f"tracking_uri '{tracking_uri}' has an unknown scheme '{parsed.scheme}:'; use {spellings}")


def _plugin_schemes() -> tuple[str, ...]:
    """Schemes that installed MLflow plugins add (MLflow's registry is internal: none when it moved)."""
    try:
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry

        return tuple(_tracking_store_registry._registry)
    except (ImportError, AttributeError):
        return ()


def preflight(tracking_uri: str, timeout_s: float = 5.0) -> str:
    """Fail in one line, before any data is loaded, when the store cannot be used; return the URI.

    Checked: the URI's spelling (see `_check_spelling`); an http(s) server answers `/health` within `timeout_s`;
    a sqlite file's folder is writable.
    """
    if tracking_uri in _checked_uris:
        return tracking_uri
    _check_spelling(tracking_uri)
    if tracking_uri.startswith(("http://", "https://")):
        url = tracking_uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - a user-chosen server
                response.read(64)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise MedpipeError(
                f"MLflow server {tracking_uri} is unreachable ({reason}); start it (mlflow server --host 127.0.0.1 "
                "--port 5000) or point MLFLOW_TRACKING_URI / --tracking_uri at a running one"
            ) from None
    elif tracking_uri.startswith("sqlite:///"):
        folder = Path(tracking_uri[len("sqlite:///") :]).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MedpipeError(f"cannot create the MLflow store folder '{folder}': {exc.strerror}") from None
        if not os.access(folder, os.W_OK):
            raise MedpipeError(f"the MLflow store folder '{folder}' is not writable")
    _checked_uris.add(tracking_uri)
    return tracking_uri


@contextlib.contextmanager
def bounded_http() -> Iterator[None]:
    """Run MLflow calls under HTTP_BOUNDS, leaving any of these variables the user set untouched, and restore
    the environment after (the bounds are for medpipe's calls, not for the user's own MLflow use)."""
    added = {k: v for k, v in HTTP_BOUNDS.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def worst_case_call_s(environ: dict[str, str] | None = None) -> float:
    """Upper bound, in seconds, of one failing MLflow HTTP call under the effective settings (the user's, else
    HTTP_BOUNDS): every attempt waits out its connect and its read timeout, and urllib3 sleeps
    `factor * 2**(n-1) + jitter` before retry n >= 2 (no sleep before the first retry)."""
    env = {**HTTP_BOUNDS, **(os.environ if environ is None else environ)}
    retries = int(env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])
    factor, jitter = float(env["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"]), float(env["MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"])
    timeout = float(env["MLFLOW_HTTP_REQUEST_TIMEOUT"])
    backoff = sum(factor * 2 ** (n - 1) + jitter for n in range(2, retries + 1))
    return (retries + 1) * 2 * timeout + backoff


def _upload_bytes(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """The size of the local file or folder an artifact call uploads (its second argument, `local_path`/`local_dir`)."""
    local = kwargs.get("local_path") or kwargs.get("local_dir") or (args[1] if len(args) > 1 else None)
    try:
        path = Path(str(local))
        return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    except OSError:
        return 0


def call_within(deadline_s: float, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`call(*args, **kwargs)` in a daemon worker thread; its result or its exception, or a TimeoutError once
    `deadline_s` seconds have passed (the worker is left to finish on its own and never holds up the exit)."""
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["value"] = call(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread as it is
            outcome["error"] = exc

    worker = threading.Thread(target=work, name="medpipe-tracking-call", daemon=True)
    worker.start()
    worker.join(deadline_s)
    if worker.is_alive():
        raise TimeoutError(f"no complete answer within {deadline_s:.0f} s: the store answers too slowly")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception as one short line: the cause when MLflow's HTTP error (several lines, hundreds of characters
    of retry bookkeeping) names one, else the start of the message."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    cause = _CAUSE.search(text)
    if cause:
        return cause.group(0)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class GuardedClient:
    """An MlflowClient whose calls run under `bounded_http()` and within a wall-time deadline (`call_within`). Until
    `arm(run_id)` (start-up) a failure raises as usual; after it, the first failing or overdue call logs one warning
    and every later call returns None without touching the store, so a lost or crawling server never stalls or
    kills training."""

    def __init__(self, client: Any, tracking_uri: str, deadline_s: float | None = None) -> None:
        self._client, self.tracking_uri, self.deadline_s = client, tracking_uri, deadline_s
        self.run_id: str | None = None
        self.lost: str | None = None  # the failure, once tracking is lost
        self.failed_calls = self.skipped_calls = 0

    def arm(self, run_id: str) -> None:
        self.run_id = run_id

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._client, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.lost is not None:
                self.skipped_calls += 1
                return None
            with bounded_http():
                deadline = self.deadline_s or CALL_DEADLINE_S or worst_case_call_s()
                if name in _ARTIFACT_CALLS:  # an upload may take longer than a call, at a rate any store manages
                    deadline += _upload_bytes(args, kwargs) / ARTIFACT_MIN_BYTES_PER_S
                if self.run_id is None:
                    return call_within(deadline, method, *args, **kwargs)
                urllib3_log = logging.getLogger("urllib3.connectionpool")
                level = urllib3_log.level
                urllib3_log.setLevel(logging.ERROR)  # one warning line (ours), not one per retry
                try:
                    return call_within(deadline, method, *args, **kwargs)
                except Exception as exc:  # connection refused, timeout, 5xx, a broken store: all end tracking alike
                    self._lose(name, exc)
                    return None
                finally:
                    urllib3_log.setLevel(level)

        return call

    def _lose(self, call: str, exc: Exception) -> None:
        self.failed_calls += 1
        self.lost = one_line(exc)
        logger.warning(
            f"tracking lost: {call} to {self.tracking_uri} failed ({self.lost}); training continues, run "
            f"{self.run_id} left RUNNING there (rerun with --resume true once the store is back to continue it)"
        )


def mlflow_client(tracking_uri: str) -> GuardedClient:
    """A guarded client of the checked store."""
    from mlflow import MlflowClient

    return GuardedClient(MlflowClient(tracking_uri=preflight(tracking_uri)), tracking_uri)


def get_or_create_experiment(client: Any, name: str, tracking_uri: str) -> str:
    """The experiment's id, created (or tagged, when it lacks a kind) as a model-training experiment; a new one on
    a sqlite store keeps its artifacts beside the database."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.tags.get(EXPERIMENT_KIND_TAG, "") in _UNSET_KINDS:
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        return experiment.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        location = (Path(tracking_uri[len("sqlite:///") :]).parent / "artifacts").resolve().as_uri()
    try:
        kind = {EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND}
        return client.create_experiment(name, artifact_location=location, tags=kind)
    except Exception:  # another process created it in between
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def write_run_record(ckpt_dir: Path, run_id: str, tracking_uri: str, experiment_id: str) -> Path:
    """`<ckpt_dir>/mlflow_run.json`: which run the checkpoints there belong to (what `--resume` reopens)."""
    record = {"run_id": run_id, "tracking_uri": tracking_uri, "experiment_id": experiment_id}
    return atomic_write_text(ckpt_dir / RUN_RECORD, json.dumps(record, indent=1) + "\n")


def read_run_record(ckpt_dir: Path) -> dict[str, str] | None:
    """The recorded run, or None (no record, or one that is not readable: a new run is then started)."""
    path = ckpt_dir / RUN_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        logger.warning(f"ignoring the unreadable run record '{path}': {one_line(exc)}")
        return None
    return record if isinstance(record, dict) and isinstance(record.get("run_id"), str) else None


def resumable_run(client: GuardedClient, ckpt_dir: Path, experiment_id: str) -> Any:
    """The run recorded in `ckpt_dir` when it is in this store and experiment and not FINISHED, else None."""
    from mlflow.exceptions import MlflowException

    record = read_run_record(ckpt_dir)
    if record is None or record.get("tracking_uri") != client.tracking_uri:
        logger.info(f"--resume: no MLflow run of {client.tracking_uri} recorded in {ckpt_dir}; a new run")
        return None
    try:
        run = client.get_run(record["run_id"])
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        logger.info(f"--resume: the recorded MLflow run {record['run_id']} is not in the store; a new run")
        return None
    info = run.info
    if info.status == "FINISHED" or info.lifecycle_stage != "active" or info.experiment_id != experiment_id:
        logger.info(f"--resume: the recorded MLflow run {info.run_id} is {info.status} ({info.lifecycle_stage}, "
                    f"experiment {info.experiment_id}); a new run")  # fmt: skip
        return None
    return run


def logged_history(client: GuardedClient, run: Any, last_epoch: int) -> list[dict[str, float]]:
    """Per-epoch rows of what `run` logged for epochs 1..`last_epoch` (the checkpoint a job resumes from); later
    epochs are trained, and logged, again."""
    rows: dict[int, dict[str, float]] = {}
    for key in run.data.metrics:
        for point in client.get_metric_history(run.info.run_id, key):
            if 1 <= point.step <= last_epoch:
                rows.setdefault(point.step, {"epoch": point.step})[key] = float(point.value)
    return [rows[step] for step in sorted(rows)]
