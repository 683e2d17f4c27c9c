"""Tracking faults (#16 item 7, #20 item 2): a job that raises marks its run FAILED (Ctrl-C: KILLED), `--resume true`
continues the killed run (same run id, every epoch's metrics), a store that dies mid-training costs one bounded call
and a warning while training finishes and writes model.pt, and a malformed tracking URI is one line. Trainings are
brain_tumor_cls on a tiny synthetic set (32 px, 16 images): seconds each."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_tracking import start_mlflow_server, stop

from conftest import REPO
from medpipe.bundle.config import run_bundle
from medpipe.cli import main
from medpipe.errors import find_medpipe_error
from medpipe.tracking.client import HTTP_BOUNDS, RUN_RECORD, GuardedClient, worst_case_call_s
from medpipe.tracking.mlflow import MLflowTracker
from medpipe.training.checkpoints import TrainingCheckpoint

BUNDLE = REPO / "bundles" / "brain_tumor_cls"
TINY = {"image_size": 32, "max_cases": 16, "num_folds": 2, "fold": 0, "batch_size": 8, "seed": 0}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medpipe.data.synthetic import make_synthetic_set

    return make_synthetic_set(tmp_path_factory.mktemp("synthetic"), per_class=8, size=32)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite store for the module (a new one costs ~10 s of schema migrations); one experiment per test."""
    return f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"


@pytest.fixture(autouse=True)
def no_user_http_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bounds under test are medpipe's own: a developer's MLFLOW_HTTP_* must not change them."""
    for key in HTTP_BOUNDS:
        monkeypatch.delenv(key, raising=False)


def train(data: Path, tmp: Path, uri: str, **overrides: object) -> None:
    settings = {"epochs": 3, "mlflow": True, "tracking_uri": uri, "experiment_name": tmp.name, **TINY, **overrides}
    run_bundle(BUNDLE, "train", dataset_dir=str(data), ckpt_dir=str(tmp / "models"), output_dir=str(tmp / "out"),
               **settings)  # fmt: skip


def the_run(uri: str, experiment: str):  # noqa: ANN201 - an mlflow Run
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def steps(client, run_id: str, key: str = "train_loss") -> list[int]:  # noqa: ANN001
    return sorted({m.step for m in client.get_metric_history(run_id, key)})


@pytest.mark.parametrize("fault, status", [(RuntimeError, "FAILED"), (KeyboardInterrupt, "KILLED")])
def test_a_job_that_dies_marks_its_run_and_resume_continues_it(
    fault: type[BaseException],
    status: str,
    synthetic: Path,
    store: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    uri = store
    save_last = TrainingCheckpoint.save_last

    def dies_in_epoch_2(self: TrainingCheckpoint, engine) -> None:  # noqa: ANN001
        if engine.state.epoch == 2:
            raise fault("injected fault")
        save_last(self, engine)

    monkeypatch.setattr(TrainingCheckpoint, "save_last", dies_in_epoch_2)
    with pytest.raises(fault):
        train(synthetic, tmp_path, uri)
    client, run = the_run(uri, tmp_path.name)
    assert run.info.status == status
    assert not (tmp_path / "models" / "model.pt").exists() and (tmp_path / "models" / "last.pt").is_file()
    assert json.loads((tmp_path / "models" / RUN_RECORD).read_text())["run_id"] == run.info.run_id

    monkeypatch.setattr(TrainingCheckpoint, "save_last", save_last)
    train(synthetic, tmp_path, uri, resume=True)
    client, resumed = the_run(uri, tmp_path.name)  # still one run: the same one, continued
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert resumed.data.tags["resumed_at_epoch"] == "1"
    assert steps(client, run.info.run_id) == [1, 2, 3]
    summary = json.loads(Path(client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path))).read_text())
    assert [row["epoch"] for row in summary["history"]] == [1, 2, 3]  # epoch 1 comes back from the store


def test_resume_of_a_finished_run_starts_a_new_one(synthetic: Path, store: str, tmp_path: Path) -> None:
    uri = store
    train(synthetic, tmp_path, uri, epochs=1)
    first = json.loads((tmp_path / "models" / RUN_RECORD).read_text())["run_id"]
    train(synthetic, tmp_path, uri, epochs=2, resume=True)
    second = json.loads((tmp_path / "models" / RUN_RECORD).read_text())["run_id"]
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    assert second != first
    assert [client.get_run(r).info.status for r in (first, second)] == ["FINISHED", "FINISHED"]
    assert steps(client, first) == [1] and steps(client, second) == [2]


def test_server_killed_mid_training_costs_one_bounded_call(
    synthetic: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A real `mlflow server` is SIGKILLed after epoch 1's metrics are logged: training goes on untracked."""
    url, server = start_mlflow_server(tmp_path / "server", workers=1)
    seen: dict[str, object] = {}
    epoch = MLflowTracker._epoch

    def epoch_then_kill_server(self: MLflowTracker, engine) -> None:  # noqa: ANN001
        epoch(self, engine)
        if engine.state.epoch == 1:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
            seen.update(tracker=self, killed_at=time.monotonic())

    monkeypatch.setattr(MLflowTracker, "_epoch", epoch_then_kill_server)
    try:
        train(synthetic, tmp_path, url)
    finally:
        stop(server)
    added_s = time.monotonic() - seen["killed_at"]
    tracker = seen["tracker"]
    assert (tmp_path / "models" / "model.pt").is_file()
    assert tracker.client.failed_calls == 1 and tracker.client.skipped_calls >= 2  # later calls never touch it
    console = capsys.readouterr()
    lost = [line for line in (console.out + console.err).splitlines() if "tracking lost:" in line]
    assert len(lost) == 1 and "training continues" in lost[0] and tracker.client.run_id in lost[0], lost
    assert "Connection refused" in lost[0] and "Retrying" not in console.out + console.err  # one line, no retry noise
    assert worst_case_call_s() <= 60  # the configured bound of that one failing call
    assert all(key not in os.environ for key in HTTP_BOUNDS)  # the bounds were medpipe's, for its calls only
    print(f"\nadded delay after the server was killed: {added_s:.1f} s (bound {worst_case_call_s():.1f} s)")


class _Always503(http.server.BaseHTTPRequestHandler):
    """A store that answers every call with 503 (an overloaded or broken proxy), counting the requests."""

    requests = 0

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        type(self).requests += 1
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST  # noqa: N815

    def log_message(self, *args: object) -> None:
        pass


def test_5xx_after_start_up_is_retried_a_bounded_number_of_times(caplog: pytest.LogCaptureFixture) -> None:
    from mlflow import MlflowClient

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Always503)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        guard = GuardedClient(MlflowClient(uri), uri)
        guard.arm("0123456789abcdef")
        assert guard.set_tag("0123456789abcdef", "k", "v") is None  # no exception reaches the training
        attempts = _Always503.requests
        assert attempts == int(HTTP_BOUNDS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) + 1
        assert guard.set_terminated("0123456789abcdef", "FINISHED") is None
        assert _Always503.requests == attempts and guard.skipped_calls == 1  # lost: the store is left alone
    finally:
        server.shutdown()
    assert sum(r.getMessage().startswith("tracking lost:") for r in caplog.records) == 1


def test_http_bounds_keep_a_users_own_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from medpipe.tracking.client import bounded_http

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
    with bounded_http():
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5"
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == HTTP_BOUNDS["MLFLOW_HTTP_REQUEST_TIMEOUT"]
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5" and "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ
    assert worst_case_call_s() > worst_case_call_s({})  # the bound reported is the user's, not ours


def test_kill_and_resume_continues_the_same_run(synthetic: Path, store: str, tmp_path: Path) -> None:
    """SIGKILL a tracked `python -m monai.bundle run training` once a last.pt exists; `--resume true` finishes the
    same MLflow run with every epoch's metrics."""
    from mlflow import MlflowClient

    uri, ckpt = store, tmp_path / "models"
    epochs = 12  # ~0.2 s each on 2 cores: the job is killed an epoch or two in, well before the end
    config = str(BUNDLE / "configs" / "train.json")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", config, "--mlflow", "true",
           "--tracking_uri", uri, "--experiment_name", tmp_path.name, "--dataset_dir", str(synthetic), "--ckpt_dir",
           str(ckpt), "--output_dir", str(tmp_path / "out"), "--epochs", str(epochs)]  # fmt: skip
    cmd += [t for k, v in TINY.items() for t in (f"--{k}", str(v))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with (tmp_path / "first.log").open("w") as log:
        job = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (ckpt / "last.pt").exists() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.killpg(job.pid, signal.SIGKILL)
    finally:
        job.wait(timeout=60)
    assert job.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    assert not (ckpt / "model.pt").exists(), "the job finished before it was killed: nothing was tested"
    client = MlflowClient(uri)
    killed = client.get_run(json.loads((ckpt / RUN_RECORD).read_text())["run_id"])
    assert killed.info.status == "RUNNING"  # a SIGKILLed process cannot mark its run

    resumed = subprocess.run([*cmd, "--resume", "true"], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert json.loads((ckpt / RUN_RECORD).read_text())["run_id"] == killed.info.run_id
    _, run = the_run(uri, tmp_path.name)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert int(run.data.tags["resumed_at_epoch"]) >= 1
    assert steps(client, run.info.run_id) == list(range(1, epochs + 1))
    assert (ckpt / "model.pt").is_file()


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("htp:/x", "unknown scheme 'htp:'"),
        ("http:/x", "names no server; spell it http://HOST:PORT"),
    ],
)
def test_malformed_tracking_uri_is_one_line(
    uri: str, expected: str, synthetic: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = ["run", "brain_tumor_cls", "train", "--mlflow", "true", "--tracking_uri", uri, "--dataset_dir",
            str(synthetic), "--ckpt_dir", str(tmp_path / "models"), "--epochs", "1"]  # fmt: skip
    try:
        code = main(argv)
    except Exception as exc:  # noqa: BLE001 - the CLI's own handling is what is tested; report what escaped
        err = find_medpipe_error(exc)
        pytest.fail(f"escaped the CLI: {type(exc).__name__}: {err or exc}")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("medpipe error: tracking_uri"), err
    assert expected in err[0]
    assert "htp:/x/mlflow.db" not in err[0]  # the old answer: a sqlite store inside a folder called 'htp:'
    assert not (tmp_path / "models").exists()


class _Trickle(http.server.BaseHTTPRequestHandler):
    """A store that answers /health at once and every other call one byte a second (a crawling proxy or server):
    each socket read gets its byte well within MLflow's timeout, so only a deadline per call ends the wait."""

    protocol_version = "HTTP/1.1"
    body = b"trickled, never a valid answer."  # 31 bytes: 31 s a call without a deadline, then a parse error
    started: list[str] = []
    finished: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path.startswith("/health"):
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"OK")
            return
        self.rfile.read(int(self.headers.get("Content-Length") or 0))  # the request's body, before answering
        type(self).started.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        try:
            for i in range(len(self.body)):
                self.wfile.write(self.body[i : i + 1])
                self.wfile.flush()
                time.sleep(1.0)
        except OSError:  # the client hung up
            return
        type(self).finished.append(self.path)

    do_POST = do_GET  # noqa: N815

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def trickling_store() -> str:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    server.daemon_threads = True
    _Trickle.started, _Trickle.finished = [], []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_trickling_store_is_lost_at_the_call_deadline(
    trickling_store: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After start-up, a call the store answers one byte a second ends at its wall-time deadline like a lost store:
    one warning, None to the training, and no later call touches the store."""
    from mlflow import MlflowClient

    import medpipe.tracking.client as client_module

    monkeypatch.setattr(client_module, "CALL_DEADLINE_S", 2.0, raising=False)
    guard = GuardedClient(MlflowClient(trickling_store), trickling_store)
    guard.arm("0123456789abcdef")
    assert guard.set_tag("0123456789abcdef", "k", "v") is None
    assert _Trickle.started and not _Trickle.finished  # given up while the store was still answering
    assert guard.lost and "no complete answer within 2 s" in guard.lost
    assert guard.log_batch("0123456789abcdef", metrics=[]) is None and guard.skipped_calls == 1
    assert len(_Trickle.started) == 1
    lost = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tracking lost:")]
    assert len(lost) == 1 and "training continues" in lost[0]


def test_a_trickling_store_at_start_up_is_one_line(
    trickling_store: str, synthetic: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """Its /health answers, so the preflight passes; the first real call meets the deadline: one line, exit 2,
    and no model written."""
    import medpipe.tracking.client as client_module

    monkeypatch.setattr(client_module, "CALL_DEADLINE_S", 2.0, raising=False)
    argv = ["run", "brain_tumor_cls", "train", "--mlflow", "true", "--tracking_uri", trickling_store, "--dataset_dir",
            str(synthetic), "--ckpt_dir", str(tmp_path / "models"), "--epochs", "1", "--image_size", "32"]  # fmt: skip
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("medpipe error:")]
    assert len(err) == 1 and "could not start" in err[0] and "no complete answer within 2 s" in err[0], err
    assert not _Trickle.finished and not (tmp_path / "models" / "model.pt").exists()
