"""MLflow tracking against a real `mlflow server` on 127.0.0.1: every bundle's 1-epoch train and evaluate runs are
read back with MlflowClient (params, tags, metrics, artifacts), `medpipe compare` prints them, and headless Chromium
checks the UI lists them. Plus the one-line errors: unreachable server, file store.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import BUNDLES, REPO, real_dataset
from medpipe.bundle.config import run_bundle
from medpipe.cli import main
from medpipe.errors import MedpipeError, find_medpipe_error
from medpipe.tracking.client import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND, get_or_create_experiment
from medpipe.tracking.mlflow import flatten_metrics, preflight
from medpipe.tracking.plots import plot_overlays

CORE_PARAMS = {"network", "image_size", "learning_rate", "epochs", "batch_size", "fold", "seed"}
CORE_TAGS = {"mlflow.source.git.commit", "bundle", "bundle_version", "versions.medpipe", "versions.monai",
             "versions.torch", "data_fingerprint"}  # fmt: skip
TRAIN_ARTIFACTS = {"config/merged_config.json", "metrics.json", "model/model.pt", "model/model.ts"}
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    """Poll `url` until it answers 200, the process dies, or `timeout_s` passes (bounded: never hangs a test)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.25)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f}s")


def stop(proc: subprocess.Popen) -> None:
    """Stop a process we started, by its PID, with its process group (mlflow's workers, Chromium's renderers)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return  # it and everything it started are gone
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


def start_mlflow_server(root: Path, workers: int = 2) -> tuple[str, subprocess.Popen]:
    """A real `mlflow server` (sqlite backend, proxied artifacts) on a free 127.0.0.1 port, answering /health;
    the caller stops it with `stop(proc)`."""
    if shutil.which("mlflow") is None and not (Path(sys.executable).parent / "mlflow").is_file():
        pytest.skip("the mlflow command is not installed")
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    exe = shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow")
    cmd = [exe, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers), "--backend-store-uri",
           f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts")]  # fmt: skip
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with (root / "server.log").open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, timeout_s=300)  # generous: a loaded CI box is slow
    except BaseException:
        stop(proc)
        raise
    return f"http://127.0.0.1:{port}", proc


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real `mlflow server` (sqlite backend, proxied artifacts, 2 workers) on a free 127.0.0.1 port."""
    url, proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow_server"))
    try:
        yield url
    finally:
        stop(proc)


def _smoke(bundle: Path, tmp_path: Path) -> dict:
    spec = json.loads((bundle / "configs" / "metadata.json").read_text())["medpipe"]
    data = real_dataset(spec["dataset"])
    return {"dataset_dir": str(data), "ckpt_dir": str(tmp_path / "models"), "seed": 0, **spec["smoke_overrides"]}


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    found: set[str] = set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_train_and_evaluate_are_tracked(bundle: Path, tmp_path: Path, mlflow_server: str) -> None:
    from mlflow import MlflowClient

    common = _smoke(bundle, tmp_path)
    experiment = f"test-{bundle.name}"
    tracking = {"mlflow": True, "tracking_uri": mlflow_server, "experiment_name": experiment}
    run_bundle(bundle, "train", output_dir=str(tmp_path / "train"), **common, **tracking)
    run_bundle(bundle, "evaluate", output_dir=str(tmp_path / "eval"), **common, **tracking)

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name(experiment)
    assert exp.tags.get(EXPERIMENT_KIND_TAG) == MODEL_TRAINING_KIND
    runs = {r.data.tags["job"]: r for r in client.search_runs([exp.experiment_id])}
    assert sorted(runs) == ["evaluate", "train"] and all(r.info.status == "FINISHED" for r in runs.values())
    train, evaluate = runs["train"], runs["evaluate"]

    train_cfg = json.loads((bundle / "configs" / "train.json").read_text())
    declared = train_cfg["tracking_params"]  # a dict, or "$dict(network=@network_name, …)"
    declared = set(declared) if isinstance(declared, dict) else set(re.findall(r"(\w+)=", declared))
    assert CORE_PARAMS <= set(train.data.params) and declared <= set(train.data.params), declared
    assert train.data.params["epochs"] == str(common["epochs"]) and train.data.params["seed"] == "0"
    assert int(train.data.params["n_train"]) > 0
    for run in (train, evaluate):
        assert CORE_TAGS <= set(run.data.tags), CORE_TAGS - set(run.data.tags)
        assert len(run.data.tags["data_fingerprint"]) == 64
        assert run.data.tags["bundle"] == bundle.name
    assert len(client.get_metric_history(train.info.run_id, "train_loss")) == common["epochs"]
    val_keys = [k for k in train.data.metrics if k.startswith("val")]
    assert val_keys, f"no validation metric logged: {sorted(train.data.metrics)}"
    assert [m.step for m in client.get_metric_history(train.info.run_id, val_keys[0])] == [1]

    train_files = _artifacts(client, train.info.run_id)
    assert TRAIN_ARTIFACTS <= train_files and "plots/learning_curves.png" in train_files

    def artifact_json(run_id: str, path: str) -> dict:
        return json.loads(Path(client.download_artifacts(run_id, path, str(tmp_path))).read_text())

    history = artifact_json(train.info.run_id, "metrics.json")
    assert [h["epoch"] for h in history["history"]] == list(range(1, common["epochs"] + 1))
    merged = artifact_json(train.info.run_id, "config/merged_config.json")
    assert merged["mlflow"] is True and merged["epochs"] == common["epochs"]

    eval_files = _artifacts(client, evaluate.info.run_id)
    assert "metrics.json" in eval_files and any(f.startswith("plots/") for f in eval_files), eval_files
    local = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for name, value in flatten_metrics(local.get("metrics", local)).items():
        assert evaluate.data.metrics[name] == pytest.approx(value), name
    if "calibration" in local and "all_classes" in local["calibration"]:  # segmentation: pixel calibration too
        ece = local["calibration"]["infection"]["ece"]
        assert evaluate.data.metrics["calibration.infection.ece"] == pytest.approx(ece)


def test_compare_prints_runs_side_by_side(mlflow_server: str, capsys: pytest.CaptureFixture) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    experiment = next((e for e in client.search_experiments() if e.name.startswith("test-")), None)
    if experiment is None:
        pytest.skip("no tracked run to compare (the tracked-run tests were skipped)")
    runs = client.search_runs([experiment.experiment_id])
    assert main(["compare", experiment.name, "--tracking_uri", mlflow_server]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    assert header[0] == "run" and sorted(header[1:]) == sorted(r.info.run_name for r in runs)
    assert any(line.startswith("param epochs") for line in lines)
    assert any(line.startswith("metric train_loss") for line in lines)


def test_compare_unknown_experiment_is_one_line(mlflow_server: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["compare", "no-such-experiment", "--tracking_uri", mlflow_server]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medpipe error: no MLflow experiment 'no-such-experiment'") and "\n" not in err


def test_ui_lists_the_runs(mlflow_server: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install -y chromium)")
    client = MlflowClient(mlflow_server)
    experiment = next((e for e in client.search_experiments() if e.name.startswith("test-")), None)
    if experiment is None:
        pytest.skip("no tracked run to look for (the tracked-run tests were skipped)")
    names = {r.info.run_name for r in client.search_runs([experiment.experiment_id])}
    cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000",
           "--dump-dom", f"{mlflow_server}/#/experiments/{experiment.experiment_id}/runs"]  # fmt: skip
    browser = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True
    )  # its renderer processes share the group: one kill ends all
    try:
        dom, _ = browser.communicate(timeout=120)
    finally:
        stop(browser)
    missing = [n for n in names if n not in dom]
    assert not missing, f"the MLflow UI page does not list runs {missing}"


def test_unreachable_server_fails_before_training(tmp_path: Path) -> None:
    bundle = BUNDLES[0]
    common = _smoke(bundle, tmp_path)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(Exception) as raised:  # noqa: B017 - MONAI wraps it; the MedpipeError is in the chain
        run_bundle(bundle, "train", output_dir=str(tmp_path / "out"), mlflow=True, tracking_uri=url, **common)
    err = find_medpipe_error(raised.value)
    assert err is not None and "unreachable" in str(err) and "\n" not in str(err)
    assert not (tmp_path / "models").exists(), "training started before the server was checked"


def test_unreachable_server_cli_prints_one_line(tmp_path: Path) -> None:
    bundle = BUNDLES[0]
    spec = json.loads((bundle / "configs" / "metadata.json").read_text())["medpipe"]
    data = real_dataset(spec["dataset"])
    url = f"http://127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
           str(bundle / "configs" / "train.json"), "--dataset_dir", str(data), "--ckpt_dir", str(tmp_path / "m"),
           "--epochs", "1", "--mlflow", "true", "--tracking_uri", url]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("medpipe error:")]
    assert len(errors) == 1 and errors[0].startswith("medpipe error: MLflow server") and "unreachable" in errors[0]


def test_file_store_is_refused_with_the_sqlite_spelling(tmp_path: Path) -> None:
    with pytest.raises(MedpipeError, match="sqlite:///"):
        preflight(str(tmp_path / "mlruns"))
    assert preflight(f"sqlite:///{tmp_path}/runs/mlflow.db").startswith("sqlite:///")
    assert (tmp_path / "runs").is_dir()


def test_experiments_are_created_as_model_training(tmp_path: Path) -> None:
    """MLflow 3's UI opens an experiment on its runs table only when it is tagged as classic model training."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    new = get_or_create_experiment(client, "new", uri)
    untagged = client.create_experiment("made-by-an-earlier-medpipe")
    chosen = client.create_experiment("users-choice", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    assert get_or_create_experiment(client, "made-by-an-earlier-medpipe", uri) == untagged
    assert get_or_create_experiment(client, "users-choice", uri) == chosen
    kinds = [client.get_experiment(e).tags.get(EXPERIMENT_KIND_TAG) for e in (new, untagged, chosen)]
    assert kinds == [MODEL_TRAINING_KIND, MODEL_TRAINING_KIND, "genai_development"]  # a user's own kind is kept


def test_model_training_kind_is_the_installed_uis() -> None:
    """The kind's value is the one the installed MLflow UI calls 'Machine learning' (its JS bundle, no Python
    constant exists): a rename in a later MLflow fails here rather than silently showing the GenAI page."""
    import mlflow

    js = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    if not js.is_dir():
        pytest.skip("this mlflow has no UI bundle")
    declared = f'CUSTOM_MODEL_DEVELOPMENT="{MODEL_TRAINING_KIND}"'
    assert any(declared in f.read_text(errors="ignore") for f in js.glob("*.js"))


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("htp:/x", "unknown scheme 'htp:'"),
        ("https://", "names no server"),
        ("sqlite://x.db", "three slashes"),
        ("file:///tmp/mlruns", "use sqlite:////tmp/mlruns/mlflow.db"),
    ],
)
def test_malformed_tracking_uri_names_the_fault(uri: str, expected: str) -> None:
    with pytest.raises(MedpipeError) as raised:
        preflight(uri)
    assert expected in str(raised.value) and "\n" not in str(raised.value)


def test_database_uris_pass_the_spelling_check() -> None:
    assert preflight("postgresql+psycopg2://user@db.example/mlflow").startswith("postgresql")


def test_flatten_metrics_names_cis() -> None:
    report = {"accuracy": {"value": 0.5, "ci95": [0.25, 0.75]}, "per_class": {"no": {"f1": {"value": 1.0}}}}
    assert flatten_metrics(report) == {
        "accuracy": 0.5, "accuracy_ci95_low": 0.25, "accuracy_ci95_high": 0.75, "per_class.no.f1": 1.0,
    }  # fmt: skip


def test_overlay_plot_is_written(tmp_path: Path) -> None:
    image = np.random.default_rng(0).random((32, 32))
    pred, label = np.zeros((32, 32), bool), np.zeros((32, 32), bool)
    pred[8:16, 8:16], label[10:18, 10:18] = True, True
    path = plot_overlays([(image, pred, label), (image, pred, None)], tmp_path / "overlays.png")
    assert path is not None and path.stat().st_size > 1000
    assert plot_overlays([], tmp_path / "none.png") is None
