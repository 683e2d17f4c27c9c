"""Faults of `medpipe serve`'s receiving and queueing, found by an outside probe, against the real node over real
DICOM associations (pynetdicom as the sending PACS, or a real Orthanc): a series that grows after its job ran or
comes again corrected is processed again whole, never in parts; a series with an instance the node could not store
is held; the same SOP instance UID in two series; a job whose file vanished; UIDs that would name paths outside
incoming/; a busy port and a damaged, locked or foreign state file. Through all of it the node keeps serving."""

from __future__ import annotations

import copy
import errno
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from orthanc import Orthanc, free_port
from test_serve import (  # noqa: F401 - fixtures
    RunningNode,
    ckpts,
    cxr_picture,
    pacs,
    rider_datasets,
    wrap_image,
    write_routing,
)

from conftest import REPO
from medpipe.errors import MedpipeError

pytestmark = [
    pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent the intended person name"),
    pytest.mark.filterwarnings("ignore:Invalid value for VR UI"),
]


# ------------------------------------------------------------------------------------------------------- helpers
def c_store(port: int, datasets: Sequence[pydicom.Dataset], calling: str = "ORTHANC") -> list[int]:
    """Send `datasets` in one association, as a PACS does; the status of each C-STORE."""
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    for sop_class, syntax in sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDPIPE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


@pytest.fixture
def node(tmp_path: Path, ckpts: dict[str, Path]) -> Iterator[Any]:  # noqa: F811
    """Start a node with results kept on disk (no destination); stopped at the end of the test."""
    started: list[RunningNode] = []

    def start(**settings: Any) -> RunningNode:
        routing = write_routing(tmp_path / "routing.json", ckpts, free_port(), None, **settings)
        started.append(RunningNode(routing))
        return serving(started[-1])

    yield start
    for running in started:
        running.stop()


def serving(running: RunningNode, timeout_s: float = 180) -> RunningNode:
    """`running` once it listens (loading the routes' models comes first and may take a while on a busy machine)."""
    deadline = time.time() + timeout_s
    while running.node.scp.server is None:
        assert running.thread.is_alive() and time.time() < deadline, "the node did not start listening"
        time.sleep(0.1)
    return running


def incoming_files(running: RunningNode) -> list[Path]:
    return sorted(p for p in running.node.incoming_dir.rglob("*") if p.is_file())


def wait_for_event(running: RunningNode, words: str, timeout_s: float = 60) -> None:
    deadline = time.time() + timeout_s
    while not any(words in e["message"] for e in running.node.queue.events(levels=("info", "warning", "error"))):
        assert time.time() < deadline, f"no event with {words!r}"
        time.sleep(0.1)


def status_text(running: RunningNode) -> str:
    from medpipe.serve.status import format_status, node_status

    return format_status(node_status(running.node.work_dir))


# -------------------------------------------------------------------------------------- 9: UIDs that name paths
def test_uid_check_follows_the_dicom_rule() -> None:
    from medpipe.serve.scp import _safe_uid

    for good in ("1.2.840.10008.5.1.4.1.1.2", "0", "0.1.2", "1.20.300", "2.25." + "9" * 59, "1.2.3\0"):
        assert _safe_uid(good, "UID") == good.rstrip("\0")
    for bad in (".", "..", "", "1..2", "1.2.", ".1.2", "1.02", "01.2", "1.2a", "1/2", "../1", "2.25." + "9" * 61):
        with pytest.raises(ValueError, match="is not a DICOM UID"):
            _safe_uid(bad, "UID")


def test_series_uid_dot_dot_is_refused_and_writes_nothing_outside_incoming(node: Any) -> None:
    running = node()
    picture = cxr_picture()
    bad = []
    for series_uid in ("..", ".", "1.02.3"):
        ds = wrap_image(picture, "CR", "CHEST")
        ds.SeriesInstanceUID = series_uid
        bad.append(ds)
    assert c_store(running.node.settings.port, bad) == [0xC000] * 3
    work = running.node.work_dir
    stray = [p for p in work.parent.rglob("*.dcm")]  # the work folder and next to it
    assert stray == [] and running.node.queue.pending_instances() == 0


# --------------------------------------------------------------- 4: one SOPInstanceUID in two series, both kept
def test_same_sop_instance_uid_in_two_series_is_kept_in_each(node: Any) -> None:
    running = node()
    picture = cxr_picture()
    first, second, other = (wrap_image(picture, "CR", "CHEST") for _ in range(3))
    second.SeriesInstanceUID, second.StudyInstanceUID = first.SeriesInstanceUID, first.StudyInstanceUID
    other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID  # another series
    assert c_store(running.node.settings.port, [first, second, other]) == [0] * 3
    jobs = running.wait(2, timeout_s=60)
    by_series = {j.series_instance_uid: j for j in jobs}
    assert by_series[first.SeriesInstanceUID].n_instances == 2
    assert by_series[other.SeriesInstanceUID].n_instances == 1
    assert len(by_series[other.SeriesInstanceUID].results) == 1
    assert incoming_files(running) == []  # nothing acknowledged is left behind


# ------------------------------------------------------------------- 2: a series that grows is processed whole
def test_series_completed_later_is_processed_again_whole(node: Any) -> None:
    import nibabel as nib

    running = node()
    port = running.node.settings.port
    series = rider_datasets(first=40, count=12)
    # the first association lacks slice 6: a CT series with a gap fails, it is never "done"
    assert c_store(port, series[:6] + series[7:]) == [0] * 11
    (failed,) = running.wait(states=("failed",))
    assert "missing slice" in failed.reason
    assert c_store(port, series[6:7]) == [0]  # the slice comes later, alone
    running.wait(2, states=("done", "failed", "superseded"))
    (done,) = running.node.queue.jobs("done")
    assert done.id != failed.id and done.n_instances == 12
    assert running.node.queue.get(failed.id).state == "superseded"
    assert f"replaced by job {done.id}" in running.node.queue.get(failed.id).reason
    out = running.node.jobs_dir / str(done.id) / "out"
    assert nib.load(out / "input_seg.nii.gz").shape[2] == 12  # one volume of the whole series
    text = status_text(running)
    assert "failed 0" in text and "superseded 1" in text and f"processed again as job {done.id}" in text

    # a series that grows after its job was done: processed again whole, the earlier job superseded
    more = rider_datasets(first=60, count=6) + rider_datasets(first=66, count=6)
    for ds in more[6:]:
        ds.StudyInstanceUID, ds.SeriesInstanceUID = more[0].StudyInstanceUID, more[0].SeriesInstanceUID
    assert c_store(port, more[:6]) == [0] * 6
    first = [j for j in running.wait(2) if j.series_instance_uid == more[0].SeriesInstanceUID][0]
    assert first.n_instances == 6
    assert c_store(port, more[6:]) == [0] * 6
    jobs = running.wait(4, states=("done", "superseded"))
    whole = [j for j in jobs if j.series_instance_uid == more[0].SeriesInstanceUID and j.id != first.id]
    assert [j.n_instances for j in whole] == [12]
    assert running.node.queue.get(first.id).state == "superseded"
    assert nib.load(running.node.jobs_dir / str(whole[0].id) / "out" / "input_seg.nii.gz").shape[2] == 12


def test_queue_carries_the_earlier_instances_into_the_new_job(tmp_path: Path) -> None:
    from medpipe.serve.queue import JobQueue

    queue = JobQueue(tmp_path / "q.sqlite")
    meta = {"series_instance_uid": "1.2.3", "modality": "CT"}
    for sop in ("1.2.3.1", "1.2.3.2"):
        queue.add_instance({**meta, "sop_instance_uid": sop, "digest": "a"}, tmp_path / sop)
    ((first, _),) = queue.collect_quiet_series(0.0)
    queue.add_instance({**meta, "sop_instance_uid": "1.2.3.3", "digest": "a"}, tmp_path / "1.2.3.3")
    ((second, paths),) = queue.collect_quiet_series(0.0)
    assert sorted(Path(p).name for p in paths) == ["1.2.3.1", "1.2.3.2", "1.2.3.3"]
    assert queue.get(second).n_instances == 3 and queue.get(first).state == "superseded"
    assert [j.id for j in queue.jobs("received")] == [second]
    assert len(queue.job_instances(first)) == 2  # the earlier job's record is left as it was
    queue.close()


# ---------------------------------------------------- 5: a corrected re-send is processed again, and says so
def test_corrected_resend_is_processed_again_and_shown(node: Any) -> None:
    running = node()
    port = running.node.settings.port
    image = wrap_image(cxr_picture(), "CR", "CHEST")
    assert c_store(port, [image]) == [0]
    (first,) = running.wait()
    assert c_store(port, [image]) == [0]  # the same again: nothing to do
    wait_for_event(running, "received again")
    corrected = copy.deepcopy(image)
    corrected.PatientName = "Corrected^Name"
    pixels = np.frombuffer(image.PixelData, dtype=np.uint16).copy()
    pixels[: pixels.size // 2] = 0
    corrected.PixelData = pixels.tobytes()
    assert c_store(port, [corrected]) == [0]
    jobs = running.wait(2, states=("done", "superseded"))
    assert [j.id for j in jobs if j.state == "done"] != [first.id]
    second = [j for j in jobs if j.state == "done"][0]
    assert running.node.queue.get(first.id).state == "superseded" and len(running.node.queue.jobs()) == 2
    used = pydicom.dcmread(running.node.jobs_dir / str(second.id) / "input" / f"{image.SOPInstanceUID}.dcm")
    assert str(used.PatientName) == "Corrected^Name"
    text = status_text(running)
    assert "1 changed instance(s)" in text and f"processed again as job {second.id}" in text
    assert "warning" in text and "its results stay in the PACS" in text
    assert incoming_files(running) == []


# ------------------------------------------------------ 3: an instance not stored holds its series; disk full
def test_series_with_an_unstored_instance_is_held_until_sent_again(
    node: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medpipe.serve import scp

    running = node()
    port = running.node.settings.port
    series = rider_datasets(first=40, count=8)
    real_write, written = scp._write_synced, []

    def disk_fills(path: Path, data: bytes) -> None:
        if len(written) >= 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(path)
        real_write(path, data)

    monkeypatch.setattr(scp, "_write_synced", disk_fills)
    assert c_store(port, series) == [0] * 4 + [0xA700] * 4
    monkeypatch.setattr(scp, "_write_synced", real_write)
    assert running.node.queue.collect_quiet_series(0.0) == []  # however long it is quiet: no job of the half
    assert running.node.queue.jobs() == []
    text = status_text(running)
    assert f"held: series {series[0].SeriesInstanceUID}: 4 instance(s) could not be stored" in text
    assert "No space left on device" in text and "Traceback" not in text
    assert c_store(port, series) == [0] * 8  # the sender tries again: all of it
    (job,) = running.wait()
    assert job.n_instances == 8 and len(running.node.queue.jobs()) == 1
    assert "held:" not in status_text(running)


def test_disk_full_while_running_waits_and_runs_again_with_one_line(
    node: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medpipe.serve.worker import Node

    real_run, calls = Node._run_route, []

    def full_once(self: Node, job: Any, route: Any) -> Any:
        calls.append(job.id)
        if len(calls) == 1:  # as a DataLoader worker re-raises it: the worker's traceback in the message
            trace = 'Traceback (most recent call last):\n  File "x.py", line 1, in f\n'
            raise OSError(f"Caught OSError in DataLoader worker process 0.\nOriginal {trace}OSError: [Errno 28] No"
                          " space left on device")  # fmt: skip
        return real_run(self, job, route)

    monkeypatch.setattr(Node, "_run_route", full_once)
    running = node()
    assert c_store(running.node.settings.port, [wrap_image(cxr_picture(), "CR", "CHEST")]) == [0]
    (job,) = running.wait()
    assert calls == [job.id, job.id]
    events = [e["message"] for e in running.node.queue.events(levels=("warning",))]
    assert any(m.endswith("OSError: [Errno 28] No space left on device") and "\n" not in m for m in events), events


# ------------------------------------------- 8 and the rest: a bad study never stops the node (real Orthanc)
def test_bad_study_then_good_study_the_node_keeps_serving(
    pacs: Orthanc,  # noqa: F811
    ckpts: dict[str, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    routing = write_routing(
        tmp_path / "routing.json", ckpts, pacs.medpipe_port, ("ORTHANC", pacs.dicom_port), quiet_seconds=2
    )
    running = serving(RunningNode(routing))
    try:
        # a series no route reads, whose received file vanishes before its job runs (deleted by hand, a cleaner …)
        knee = pacs.upload([wrap_image(cxr_picture(), "MR", "KNEE")])
        pacs.push_to_medpipe(knee)
        for path in incoming_files(running):
            path.unlink()
        (bad,) = running.wait(states=("failed",), timeout_s=60)
        assert "is gone" in bad.reason
        # a series with a missing slice
        gap = pacs.upload(rider_datasets(first=40, count=8, drop=3))
        pacs.push_to_medpipe(gap)
        running.wait(2, states=("failed",))
        # then a good one: its results come back
        good = wrap_image(cxr_picture(), "CR", "CHEST")
        series_id = pacs.upload([good])
        pacs.push_to_medpipe(series_id)
        running.wait(3, states=("done", "failed"))
        (done,) = running.node.queue.jobs("done")
        assert done.series_instance_uid == good.SeriesInstanceUID and running.thread.is_alive()
        assert pacs.wait_for_modality(series_id, "SR")
    finally:
        running.stop()


# ------------------------------------------------------------- 12: port in use, damaged / foreign state file
def _medpipe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medpipe", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300)  # fmt: skip


def _one_line_error(shown: subprocess.CompletedProcess, *words: str) -> None:
    assert shown.returncode != 0, shown
    *log, last = shown.stderr.splitlines()  # the node logs what it did before it stopped
    assert last.startswith("medpipe error: ") and all(" INFO " in line for line in log), shown.stderr
    assert "Traceback" not in shown.stderr + shown.stdout
    for word in words:
        assert word in last, shown.stderr


def test_status_is_read_only_and_refuses_what_is_not_a_queue(tmp_path: Path) -> None:
    from medpipe.serve.queue import JobQueue
    from medpipe.serve.status import node_status

    work = tmp_path / "node"
    work.mkdir()
    (work / "queue.sqlite").write_bytes(b"")  # zero bytes: an empty SQLite database, not a node's queue
    _one_line_error(_medpipe("serve", "status", str(work)), "not a medpipe node queue")
    assert (work / "queue.sqlite").stat().st_size == 0  # status wrote nothing into it
    (work / "queue.sqlite").write_bytes(b"not a database at all " * 200)
    _one_line_error(_medpipe("serve", "status", str(work)), "queue.sqlite", "not a database")
    (work / "queue.sqlite").unlink()
    foreign = sqlite3.connect(work / "queue.sqlite")
    foreign.execute("CREATE TABLE patients (name TEXT)")
    foreign.commit()
    foreign.close()
    _one_line_error(_medpipe("serve", "status", str(work)), "not a medpipe node queue")
    with pytest.raises(MedpipeError, match="not a medpipe node queue"):
        JobQueue(work / "queue.sqlite")  # nor does the node take over another program's database

    (work / "queue.sqlite").unlink()
    queue = JobQueue(work / "queue.sqlite")
    queue.add_instance({"series_instance_uid": "1.2", "sop_instance_uid": "1.2.3"}, work / "x.dcm")
    queue.close()
    before = (work / "queue.sqlite").read_bytes()
    assert node_status(work)["instances_not_in_a_job"] == 1
    assert (work / "queue.sqlite").read_bytes() == before
    locker = sqlite3.connect(work / "queue.sqlite", isolation_level=None)
    try:  # another process holds the file locked
        locker.execute("PRAGMA locking_mode=EXCLUSIVE")
        locker.execute("BEGIN EXCLUSIVE")
        locker.execute("INSERT INTO events (at, level, message) VALUES (0, 'info', 'x')")
        with pytest.raises(MedpipeError, match="locked"):
            node_status(work, timeout_s=0.2)
        with pytest.raises(MedpipeError, match="locked"):
            JobQueue(work / "queue.sqlite", timeout_s=0.2)
    finally:
        locker.close()


def test_port_in_use_and_damaged_queue_stop_the_node_with_one_line(
    tmp_path: Path,
    ckpts: dict[str, Path],  # noqa: F811
) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        routing = write_routing(tmp_path / "routing.json", ckpts, port, None)
        settings = json.loads(routing.read_text())
        settings["routes"] = [r for r in settings["routes"] if r["name"] == "chest_xray"]  # one model loads quickly
        routing.write_text(json.dumps(settings))
        _one_line_error(_medpipe("serve", str(routing)), f"cannot listen on 127.0.0.1:{port}", "in use")
    (tmp_path / "node" / "queue.sqlite").write_bytes(b"garbage " * 1000)
    _one_line_error(_medpipe("serve", str(routing)), "queue.sqlite", "not a database")
