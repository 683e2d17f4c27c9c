"""`medpipe cv --cluster` on a two-node Ray cluster on 127.0.0.1 (`ray start --head` + `ray start --address`, one CPU
each): the run folder equals the local run's, and a fold whose node dies mid-fold is run again, leaving complete
folds only. The cluster's processes are found by a marker in their environment and killed by pid at the end."""

from __future__ import annotations

import concurrent.futures
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from conftest import REPO, finish_or_kill
from medpipe.data.synthetic import make_synthetic_set

pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[ray]'")

RAY = Path(sys.executable).with_name("ray")
MARKER = "MEDPIPE_TEST_RAY_CLUSTER"  # inherited by every process the two `ray start` commands spawn
# Every Ray process of these tests (both nodes, the drivers) uses one token of its own: a token file that an earlier
# local `ray.init()` left in ~/.ray would otherwise turn authentication on for the head and not for the others
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
RUN_TIMEOUT_S = 300
MANIFEST = "inference_manifest.jsonl"
# 3 epochs: a fold trains long enough (its training.lock stands) for the test to kill its node while it does
FOLD_ARGS = ["--network", "paper_cnn", "--folds", "2", "--epochs", "3", "--image_size", "32"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pids_of(marker: str, root: Path) -> list[int]:
    """Processes of this test's cluster: those that inherited the marker, and those holding files under its root (the
    agents a raylet starts get an environment of their own, and outlive a killed raylet)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker.encode() in (proc / "environ").read_bytes() or any(
                os.readlink(fd).startswith(str(root)) for fd in (proc / "fd").iterdir()
            ):
                pids.append(int(proc.name))
        except OSError:  # gone, or not ours to read
            continue
    return pids


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root, self.tag = root, uuid.uuid4().hex
        self.address = f"127.0.0.1:{_free_port()}"
        self._started: concurrent.futures.Future | None = None
        self.env = {**os.environ, **RAY_ENV, MARKER: self.tag, "OMP_NUM_THREADS": "1",
                    # a dead node is noticed in ~2 s instead of ~30 s
                    "RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "4"}  # fmt: skip

    def start_in_background(self) -> None:
        """Start the two nodes while the local run trains (most of `ray start` is waiting)."""
        self._started = concurrent.futures.ThreadPoolExecutor(1).submit(self._start)

    def ready(self) -> str:
        assert self._started is not None, "start_in_background first"
        self._started.result(timeout=180)
        return self.address

    def _start(self) -> None:
        common = ["--num-cpus", "1", "--disable-usage-stats"]
        head = [str(RAY), "start", "--head", "--port", self.address.split(":")[1], "--include-dashboard", "false",
                "--ray-client-server-port", str(_free_port()), "--temp-dir", str(self.root / "head"), *common]
        worker = [str(RAY), "start", "--address", self.address, "--temp-dir", str(self.root / "worker"), *common]
        for cmd in (head, worker):
            done = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=120)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    def worker_raylet(self) -> int:
        """The pid of the second node's raylet (its --temp_dir is the worker's)."""
        want = f"--temp_dir={self.root / 'worker'}".encode()
        for pid in _pids_of(self.tag, self.root):
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if args[0].endswith(b"raylet") and want in args:
                return pid
        raise AssertionError("the worker node's raylet is not running")

    def stop(self) -> None:
        if self._started is not None:
            concurrent.futures.wait([self._started], timeout=180)  # no node may come up after the clean-up
        for _ in range(3):  # a dying raylet may still be starting a worker
            _kill(_pids_of(self.tag, self.root))
            time.sleep(0.3)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # a short root: Ray's unix sockets live below it, and a socket path may hold at most 107 characters
    root = Path(tempfile.mkdtemp(prefix="mpray", dir="/tmp"))
    nodes = Cluster(root)
    try:
        nodes.start_in_background()
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_set(tmp_path_factory.mktemp("raydata") / "data", per_class=6, size=32)


@pytest.fixture(scope="module")
def local_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same CV on this machine, folds one after another, on one thread as each cluster fold is."""
    out = tmp_path_factory.mktemp("local") / "cv"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from medpipe.cli import main

        assert main(["cv", "brain_tumor_cls", *FOLD_ARGS, "--out", str(out), "--dataset_dir", str(data)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def _sigint_as_in_a_terminal() -> None:
    """A suite started in the background hands SIGINT down ignored: give the CLI the default, as a terminal does."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cv_on(cluster: Cluster, data: Path, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "medpipe", "cv", "brain_tumor_cls", *FOLD_ARGS, "--out", str(out), "--dataset_dir",
           str(data), "--cluster", cluster.ready(), "--cpus_per_fold", "1"]  # fmt: skip
    env = {**os.environ, **RAY_ENV, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_sigint_as_in_a_terminal)  # fmt: skip


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    return finish_or_kill(proc, RUN_TIMEOUT_S, "the cluster run")


def _assert_same_run(run: Path, local: Path) -> None:
    """Same files, same partition, same weights, same predictions, same summary figures."""
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == sorted(
        p.relative_to(local).as_posix() for p in local.rglob("*"))  # fmt: skip
    assert (run / "splits.json").read_text() == (local / "splits.json").read_text()
    for fold in ("fold0", "fold1"):
        assert (run / fold / "predictions.csv").read_text() == (local / fold / "predictions.csv").read_text()
        ours = torch.load(run / fold / "model.pt", map_location="cpu", weights_only=True)
        theirs = torch.load(local / fold / "model.pt", map_location="cpu", weights_only=True)
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), fold
    summaries = [json.loads((d / "cv_summary.json").read_text()) for d in (run, local)]
    for summary in summaries:
        for key in ("wall_time_s", "splits", "cluster"):
            summary.pop(key, None)
    assert summaries[0] == summaries[1]


def test_no_cluster_at_the_address_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Ray itself retries an address nothing listens on for minutes; medpipe says so at once, writing nothing."""
    from medpipe.cli import main

    address = f"127.0.0.1:{_free_port()}"
    out = tmp_path / "cv"
    assert main(["cv", "brain_tumor_cls", "--out", str(out), "--dataset_dir", str(tmp_path), "--cluster", address]) == 2
    assert capsys.readouterr().err.startswith(f"medpipe error: --cluster {address}: nothing answers")
    assert not out.exists()


def test_cv_on_two_nodes_writes_the_local_runs_folder(cluster: Cluster, data: Path, local_run: Path,
                                                      tmp_path: Path) -> None:  # fmt: skip
    code, out, err = _finish(_cv_on(cluster, data, tmp_path / "cv"))
    assert code == 0, err[-3000:]
    assert "fold 0 finished" in out and "fold 1 finished" in out
    assert json.loads((tmp_path / "cv" / "cv_summary.json").read_text())["cluster"] == cluster.address
    _assert_same_run(tmp_path / "cv", local_run)


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


WORKER_EXIT_S = 10.0


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


def _training_pid(out: Path, raylet: int | None = None) -> int | None:
    """The pid of a worker (of that raylet, when given) that is training a fold now: the fold's training.lock names
    it."""
    for fold in (0, 1):
        try:
            pid = int(json.loads((out / f"fold{fold}" / "training.lock").read_text())["pid"])
        except (OSError, ValueError, KeyError):  # not there yet, gone again, or being written
            continue
        if raylet is None or _parent(pid) == raylet:
            return pid
    return None


def test_ctrl_c_stops_the_folds_tasks(cluster: Cluster, data: Path, tmp_path: Path) -> None:
    """Ctrl-C in the driver cancels the running fold tasks (their workers end), removes the unfinished folds and
    ends in one line."""
    cluster.ready()
    out = tmp_path / "cv"
    proc = _cv_on(cluster, data, out)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while (worker := _training_pid(out)) is None:
            assert proc.poll() is None and time.monotonic() < deadline, "the CV ended before a fold trained"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the interrupted cluster CV did not end within 60 s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    lines = [line for line in err.splitlines() if line.startswith("medpipe error:")]
    assert proc.returncode == 2 and lines and lines[-1].startswith("medpipe error: interrupted:"), err[-3000:]
    assert "Traceback" not in err
    # Ray reports a force-cancelled task done once the kill is sent; its worker process ends a moment later (one
    # clean-clone run found it still alive right at the driver's exit), so it gets a few seconds, not forever
    deadline = time.monotonic() + WORKER_EXIT_S
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker), f"the worker training a fold outlived the interrupted run by {WORKER_EXIT_S} s"
    assert not list(out.glob("fold*")) and (out / "splits.json").is_file()


# --- inference over many inputs (`medpipe run BUNDLE inference --cluster`) ---------------------------------------


def _random_checkpoint(bundle: str, path: Path, **overrides: object) -> Path:
    """The bundle's network with seeded initial weights: the outputs are compared, not judged."""
    from monai.bundle import ConfigParser

    from medpipe.bundle.config import config_files

    parser = ConfigParser()
    parser.read_config(config_files(REPO / "bundles" / bundle, "train"))
    parser.update({"bundle_root": str(REPO / "bundles" / bundle), **overrides})
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    return path


def _medpipe(*args: str) -> subprocess.CompletedProcess:
    """`medpipe …` in a process of its own, as a user types it."""
    env = {**os.environ, **RAY_ENV, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "medpipe", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    code, out, err = _finish(proc)
    return subprocess.CompletedProcess(proc.args, code, out, err)


def _local_inference(bundle: str, out: Path, *args: str) -> Path:
    """The bundle's inference job on this machine, in this process, on one thread as each task runs."""
    from medpipe.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["run", bundle, "inference", "--output_dir", str(out), *args]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_inference_cluster_refusals_are_one_line(brain_yes_no: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    """Checked before any cluster is reached or anything written (the address below answers nothing)."""
    from medpipe.cli import main

    nowhere = f"127.0.0.1:{_free_port()}"
    ckpt = _random_checkpoint("brain_tumor_cls", tmp_path / "model.pt", image_size=32)
    out = tmp_path / "out"
    common = ["--input", str(brain_yes_no / "yes"), "--ckpt_path", str(ckpt), "--image_size", "32",
              "--output_dir", str(out)]  # fmt: skip
    out.mkdir()
    (out / MANIFEST).write_text(json.dumps({"format": "medpipe inference manifest 1", "bundle": "covid_ct_seg"}) + "\n")
    cases = [
        (["train", "--cluster", nowhere], "--cluster runs inference jobs, not 'train'"),
        (["inference", "--per_task", "4"], "--per_task applies to inference on a --cluster"),
        (["inference", *common, "--cluster", nowhere, "--per_task", "0"], "--per_task and --cpus_per_task must be"),
        (["inference", *common, "--cluster", nowhere, "--batch_size", "4", "--per_task", "6"],
         "--per_task 6 is not a multiple of the bundle's batch_size 4"),
        (["inference", *common, "--cluster", nowhere], "holds inference made with other settings"),
    ]  # fmt: skip
    for args, message in cases:
        assert main(["run", "brain_tumor_cls", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("medpipe error: ") and message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST]


def test_parts_run_in_one_worker_reuse_its_network_and_join_to_the_local_summary(brain_yes_no: Path,
                                                                                 tmp_path: Path) -> None:  # fmt: skip
    """Two parts in one process (as one Ray worker runs them): the network is built once, and the parts' rows
    joined give the local run's predictions.csv."""
    from medpipe.bundle import archive

    bundle = REPO / "bundles" / "brain_tumor_cls"
    images = [str(p) for p in sorted((brain_yes_no / "yes").iterdir())[:8]]
    ckpt = _random_checkpoint("brain_tumor_cls", tmp_path / "model.pt", image_size=32)
    common = {"ckpt_path": str(ckpt), "image_size": 32, "batch_size": 4, "input_guard": False}
    local = _local_inference("brain_tumor_cls", tmp_path / "local", "--input", ",".join(images),
                             *[f"--{k}={v}" for k, v in common.items()])  # fmt: skip
    archive._NETWORKS.clear()
    parts = [archive.infer_part(bundle, None, "images", images[i : i + 4], None, str(tmp_path / "out"), f"p{i}", 1,
                                **common) for i in (0, 4)]  # fmt: skip
    assert len(archive._NETWORKS) == 1, "the second part built its own network"
    text = archive.KINDS["images"].join(parts[0]["header"], parts[0]["rows"] + parts[1]["rows"])
    assert text.encode() == (local / "predictions.csv").read_bytes()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".parts"]  # the rows went back, no file stays
    archive._NETWORKS.clear()


def test_image_inference_on_two_nodes_equals_the_local_run_and_resumes(cluster: Cluster, brain_yes_no: Path,
                                                                       tmp_path: Path) -> None:  # fmt: skip
    """brain_tumor_cls over 10 real images, 4 per task (one batch each): predictions.csv equals the local run's; a
    run over the first 8 then over all 10 runs only the last 2; a third run runs nothing and writes nothing."""
    images = [str(p) for p in sorted((brain_yes_no / "yes").iterdir())[:10]]
    ckpt = _random_checkpoint("brain_tumor_cls", tmp_path / "model.pt", image_size=32)
    common = ["--ckpt_path", str(ckpt), "--image_size", "32", "--batch_size", "4", "--input_guard", "false"]
    local = _local_inference("brain_tumor_cls", tmp_path / "local", "--input", ",".join(images), *common)
    out = tmp_path / "ray"
    cluster_args = ["--output_dir", str(out), *common, "--cluster", cluster.ready(), "--per_task", "4"]

    first = _medpipe("run", "brain_tumor_cls", "inference", "--input", ",".join(images[:8]), *cluster_args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "[8/8] images finished" in first.stdout
    done = _medpipe("run", "brain_tumor_cls", "inference", "--input", ",".join(images), *cluster_args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "8 of 10 images already finished" in done.stdout and "[10/10] images finished" in done.stdout
    assert (out / "predictions.csv").read_bytes() == (local / "predictions.csv").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["inference_manifest.jsonl", "predictions.csv"]

    before = _mtimes(out)
    again = _medpipe("run", "brain_tumor_cls", "inference", "--input", ",".join(images), *cluster_args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "10 of 10 images already finished" in again.stdout and "0 to run" in again.stdout
    assert _mtimes(out) == before


def test_ct_inference_on_two_nodes_writes_the_local_runs_files(cluster: Cluster, tmp_path: Path) -> None:
    """covid_ct_seg over one small series as DICOM and as NRRD, one series per task: the same masks and a
    report.json equal to the local run's but for the seconds each series took."""
    from conftest import real_dataset

    cip = real_dataset("ct_volumes") / "cip_ct64"
    series = [str(cip / "dicom"), str(cip / "ct-64.nrrd")]
    ckpt = _random_checkpoint("covid_ct_seg", tmp_path / "model.pt", image_size=64)
    common = ["--input", ",".join(series), "--ckpt_path", str(ckpt), "--image_size", "64", "--input_guard", "false"]
    local = _local_inference("covid_ct_seg", tmp_path / "local", *common)
    out = tmp_path / "ray"
    run = _medpipe("run", "covid_ct_seg", "inference", "--output_dir", str(out), *common, "--cluster",
                   cluster.ready())  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "[2/2] series finished" in run.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted([*(p.name for p in local.iterdir()), MANIFEST])
    import nibabel as nib

    for name in (p.name for p in local.iterdir() if p.name.endswith(".nii.gz")):  # gzip headers may hold times
        ours, theirs = nib.load(out / name), nib.load(local / name)
        assert (ours.get_fdata() == theirs.get_fdata()).all() and (ours.affine == theirs.affine).all(), name
    reports = [json.loads((d / "report.json").read_text()) for d in (out, local)]
    for report in reports:
        for volume in report["volumes"]:
            volume.pop("seconds")
    assert reports[0] == reports[1]


def test_a_fold_whose_node_dies_is_run_again(cluster: Cluster, data: Path, local_run: Path, tmp_path: Path) -> None:
    """Kill the second node (its raylet and the worker running a fold there) while that fold trains:
    Ray runs the lost fold again on the head node, that attempt clears what the dead one left, and the run folder
    ends as the local run's. Last in the module: the other test needs both nodes."""
    cluster.ready()
    raylet = cluster.worker_raylet()
    out = tmp_path / "cv"
    proc = _cv_on(cluster, data, out)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while (worker := _training_pid(out, raylet)) is None:
            assert proc.poll() is None and time.monotonic() < deadline, "the CV ended before the node could die"
            time.sleep(0.01)
        _kill([raylet, worker])  # the node dies: its raylet and the worker running the fold
        code, _, err = _finish(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert code == 0, err[-3000:]
    assert "clearing what an earlier attempt left" in err
    _assert_same_run(out, local_run)


