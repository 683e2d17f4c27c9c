"""MLflow tracking against a real `mlflow server` on 127.0.0.1: every bundle's 1-epoch train and evaluate runs are
read back with MlflowClient (params, tags, metrics, artifacts), `medpipe compare` prints them, and headless Chromium
checks the UI lists them. Plus the one-line errors: unreachable server, file store.
"""

from __future__ import annotations

import json
import os
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


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real `mlflow server` (sqlite backend, proxied artifacts, 2 workers) on a free 127.0.0.1 port."""
    if shutil.which("mlflow") is None and not (Path(sys.executable).parent / "mlflow").is_file():
        pytest.skip("the mlflow command is not installed")
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    exe = shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow")
    cmd = [exe, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "2", "--backend-store-uri",
           f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts")]  # fmt: skip
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, timeout_s=300)  # generous: a loaded CI box is slow
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)
        log.close()


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
    runs = {r.data.tags["job"]: r for r in client.search_runs([exp.experiment_id])}
    assert sorted(runs) == ["evaluate", "train"] and all(r.info.status == "FINISHED" for r in runs.values())
    train, evaluate = runs["train"], runs["evaluate"]

    train_cfg = json.loads((bundle / "configs" / "train.json").read_text())
    assert CORE_PARAMS <= set(train.data.params) and set(train_cfg["tracking_params"]) <= set(train.data.params)
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
    browser = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               start_new_session=True)  # its renderer processes share the group: one kill ends all
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
