"""The DICOM node over DICOMweb (docs/serve.md, "DICOMweb"): results sent by STOW-RS, a study pulled by QIDO-RS +
WADO-RS, a destination that is down retried with the node's back-off and then delivered, a refusal that no retry can
change (HTTP 4xx) reported as a failed job, and the routing file's destination kinds. Against a real Orthanc with its
DICOMweb plugin (Debian package orthanc-dicomweb) and the real node; the CT model is the bundle's network with seeded
weights (the tests check the DICOM flow, not accuracy)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from orthanc import DICOMWEB_PLUGIN, ORTHANC, Orthanc, free_port
from test_serve import RIDER, RunningNode, make_checkpoint, rider_datasets

from conftest import REPO, real_dataset
from medpipe.errors import MedpipeError

pytestmark = [
    pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent the intended person name"),
    pytest.mark.filterwarnings("ignore:Invalid value for VR UI"),  # the instance with a broken UID, on purpose
]
SLICES = 6  # a few RIDER slices: enough for a SEG and an SR, fast on a CPU


# ------------------------------------------------------------------------------------------------------- helpers
def needs_orthanc_dicomweb() -> None:
    """Skip without Orthanc or its DICOMweb plugin, except in CI, whose .ci/run installs both: fail there."""
    missing = "Orthanc" if ORTHANC is None else "Orthanc's DICOMweb plugin" if DICOMWEB_PLUGIN is None else None
    if missing is None:
        return
    why = f"{missing} is not installed: apt-get install orthanc orthanc-dicomweb (as .ci/run does)"
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)


def qido_modalities(url: str, study_uid: str) -> list[str]:
    """The Modality of every instance of the study, as QIDO-RS lists them."""
    from dicomweb_client.api import DICOMwebClient

    found = DICOMwebClient(url).search_for_instances(study_instance_uid=study_uid, fields=["Modality"])
    return sorted(str(pydicom.Dataset.from_json(item).Modality) for item in found)


def write_routing(path: Path, ckpt: Path, destination: dict[str, Any] | None, **node: Any) -> Path:
    routing: dict[str, Any] = {
        "node": {"ae_title": "MEDPIPE", "port": free_port(), "work_dir": str(path.parent / "node"),
                 "quiet_seconds": 0.5, "backoff_s": 0.3, "backoff_max_s": 1, **node},
        "routes": [{"name": "chest_ct", "task": "ct_segmentation", "bundle": "covid_ct_seg",
                    "checkpoints": [str(ckpt)], "modality": "CT", "body_part": ["CHEST", "LUNG", "THORAX", ""]}],
    }  # fmt: skip
    if destination is not None:
        routing["destination"] = destination
    path.write_text(json.dumps(routing, indent=2))
    return path


def c_store(port: int, datasets: list[pydicom.Dataset]) -> None:
    """Send `datasets` to the node as a PACS would: C-STORE over one association, every status a success."""
    from pynetdicom import AE

    ae = AE(ae_title="ORTHANC")
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, [str(ds.file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDPIPE")
    assert assoc.is_established, "the node refused the association"
    try:
        assert [int(assoc.send_c_store(ds).Status) for ds in datasets] == [0] * len(datasets)
    finally:
        assoc.release()


def send_attempts_reach(node: RunningNode, job_id: int, attempts: int, timeout_s: float = 60) -> None:
    deadline = time.time() + timeout_s
    while node.node.queue.get(job_id).send_attempts < attempts:
        assert time.time() < deadline, f"no retry: {node.node.queue.get(job_id)}"
        time.sleep(0.1)


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    needs_orthanc_dicomweb()
    real_dataset(RIDER)
    orthanc = Orthanc(tmp_path_factory.mktemp("orthanc"), medpipe_port=free_port())
    yield orthanc
    orthanc.stop()


@pytest.fixture(scope="module")
def ct_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint("covid_ct_seg", tmp_path_factory.mktemp("ckpts") / "ct.pt")


@pytest.fixture
def node_for(tmp_path: Path, ct_ckpt: Path) -> Iterator[Any]:
    started: list[RunningNode] = []

    def start(destination: dict[str, Any] | None) -> RunningNode:
        started.append(RunningNode(write_routing(tmp_path / "routing.json", ct_ckpt, destination)))
        deadline = time.time() + 120  # RunningNode waits 10 s; loading the model can take longer on a busy CPU
        while started[-1].node.scp.server is None:
            assert started[-1].thread.is_alive() and time.time() < deadline, "the node did not start listening"
            time.sleep(0.1)
        return started[-1]

    yield start
    for running in started:
        running.stop()


# --------------------------------------------------------------------------------------------------------- tests
def test_stow_rs_delivers_the_ct_seg_and_sr_to_orthanc(pacs: Orthanc, node_for: Any) -> None:
    source = rider_datasets(first=40, count=SLICES)
    node = node_for({"dicomweb": pacs.dicomweb_url})
    c_store(node.node.settings.port, source)
    (job,) = node.wait()
    assert job.route == "chest_ct" and job.send_attempts == 0
    study = str(source[0].StudyInstanceUID)
    assert qido_modalities(pacs.dicomweb_url, study) == ["SEG", "SR"]  # the source went only to the node
    sent = {str(pydicom.dcmread(p).SOPInstanceUID) for p in job.results}
    stored = {str(i["MainDicomTags"]["SOPInstanceUID"]) for i in pacs.get("/instances?expand")}
    assert sent <= stored


def test_destination_down_is_retried_with_back_off_then_delivered(pacs: Orthanc, node_for: Any, tmp_path: Path) -> None:
    from medpipe.serve.status import format_status, node_status

    port = free_port()  # where the destination will listen once it is up
    node = node_for({"dicomweb": f"http://127.0.0.1:{port}/dicom-web", "timeout_s": 5})
    source = rider_datasets(first=40, count=SLICES)
    c_store(node.node.settings.port, source)
    (job,) = node.wait(states=("send_pending",))
    send_attempts_reach(node, job.id, 2)
    waiting = node.node.queue.get(job.id)
    assert waiting.state == "send_pending" and "cannot connect (Connection refused)" in waiting.reason
    status = node_status(node.node.work_dir)
    assert status["waiting_to_send"][0]["job"] == job.id and "waiting to send: job" in format_status(status)
    retries = [e["message"] for e in node.node.queue.events(("warning",), limit=50) if e.get("job_id") == job.id]
    assert len(retries) >= 2 and all(m.startswith("send failed, retry in") for m in retries)

    late = Orthanc(tmp_path / "late_orthanc", medpipe_port=free_port(), http_port=port)
    try:
        (job,) = node.wait()
        assert qido_modalities(late.dicomweb_url, str(source[0].StudyInstanceUID)) == ["SEG", "SR"]
    finally:
        late.stop()


def test_a_refusal_no_retry_changes_fails_the_job_with_the_http_status(pacs: Orthanc, node_for: Any) -> None:
    """A wrong service root: Orthanc answers 404 to the STOW-RS; the job fails at once, naming it, results kept."""
    node = node_for({"dicomweb": f"{pacs.url}/no-such-root"})
    c_store(node.node.settings.port, rider_datasets(first=40, count=SLICES))
    (job,) = node.wait(states=("failed",))
    assert "HTTP 404" in job.reason and "not retried" in job.reason and job.send_attempts == 0
    assert all(Path(p).is_file() for p in job.results)


def test_wado_rs_pull_brings_a_study_into_the_node(pacs: Orthanc, node_for: Any) -> None:
    from medpipe.serve.pull import parse_peer, pull_study

    source = rider_datasets(first=40, count=SLICES)
    study = str(source[0].StudyInstanceUID)
    pacs.upload(source)
    node = node_for({"dicomweb": pacs.dicomweb_url})
    peer = parse_peer(f"dicomweb+{pacs.dicomweb_url}")
    assert pull_study(node.node.settings, peer, study) == SLICES
    (job,) = node.wait()
    assert job.route == "chest_ct" and job.n_instances == SLICES
    inputs = sorted(p.stem for p in (node.node.jobs_dir / str(job.id) / "input").glob("*.dcm"))
    assert inputs == sorted(str(ds.SOPInstanceUID) for ds in source)
    # the study now holds the node's own results (sent back by STOW-RS): a second pull lists them and leaves them
    # (not fetched, not failures); its images are the same series again, which the node does not process twice
    assert qido_modalities(pacs.dicomweb_url, study) == ["CT"] * SLICES + ["SEG", "SR"]
    assert pull_study(node.node.settings, peer, study) == SLICES
    with pytest.raises(MedpipeError, match="holds no instance of study 1.2.3.4"):
        pull_study(node.node.settings, peer, "1.2.3.4")


def test_wado_rs_pull_with_a_failed_instance_exits_non_zero_naming_it(pacs: Orthanc, tmp_path: Path) -> None:
    from medpipe.serve.queue import JobQueue

    images = rider_datasets(first=80, count=4)
    bad = "1.2.826.0.1.not-a-uid"
    images[2].SOPInstanceUID = images[2].file_meta.MediaStorageSOPInstanceUID = bad
    pacs.upload(images)  # Orthanc keeps it; the node cannot file it (it names files by UID)
    routing = tmp_path / "routing.json"
    routing.write_text(json.dumps({"node": {"work_dir": str(tmp_path / "node")}}))
    cli = [sys.executable, "-m", "medpipe", "pull", str(images[0].StudyInstanceUID), str(routing)]
    done = subprocess.run([*cli, "--source", f"dicomweb+{pacs.dicomweb_url}"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)  # fmt: skip
    assert done.returncode != 0
    error = done.stderr.strip().splitlines()[-1]  # after pydicom's warning about the same UID
    assert error.startswith("medpipe error: WADO-RS pull of study")
    assert f"1 instance(s) failed (first: {bad}: ValueError: SOPInstanceUID" in error
    assert "the 3 image(s) stored are in the node's queue" in error
    queue = JobQueue(tmp_path / "node" / "queue.sqlite")
    assert queue.pending_instances() == 3
    queue.close()


# ------------------------------------------------------------------------------------ no Orthanc: faults, settings
def test_stow_timeouts_and_http_errors_are_retried_other_4xx_refused_with_credentials_sent(tmp_path: Path) -> None:
    """A service that accepts the connection and never answers, one that answers 503, then 413: the first two may pass
    (SendError), the last never will (SendRefused). The requests carry the destination's credentials, and a pull from
    the same URL borrows them (its QIDO-RS failing with the 503 is one line)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from medpipe.serve.pull import pull_study
    from medpipe.serve.routing import DicomWebService, WebAuth, load_settings
    from medpipe.serve.sender import SendError, SendRefused, stow_files

    files = sorted(real_dataset(RIDER).glob("*.dcm"))[:1]
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    try:
        with pytest.raises(SendError, match="no answer within the timeout") as caught:
            stow_files(files, DicomWebService(f"http://127.0.0.1:{silent.getsockname()[1]}/dicom-web", timeout_s=0.5))
        assert not isinstance(caught.value, SendRefused)
    finally:
        silent.close()

    answers = iter([503, 413, 503])
    seen: list[tuple[str, str, str | None]] = []  # method, path, Authorization

    class Answer(BaseHTTPRequestHandler):
        def answer(self) -> None:
            seen.append((self.command, self.path.split("?")[0], self.headers.get("Authorization")))
            self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
            self.send_response(next(answers))
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = answer  # noqa: N815 - http.server's names

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    try:
        with pytest.raises(SendError, match="HTTP 503") as caught:
            stow_files(files, DicomWebService(url, WebAuth(token="t0ken"), timeout_s=10))
        assert not isinstance(caught.value, SendRefused)
        with pytest.raises(SendRefused, match="HTTP 413 .*not retried"):
            stow_files(files, DicomWebService(url, timeout_s=10))
        routing = tmp_path / "routing.json"
        auth = {"username": "medpipe", "password": "pw"}
        routing.write_text(json.dumps({"node": {"work_dir": str(tmp_path / "node")},
                                       "destination": {"dicomweb": url, "auth": auth}}))  # fmt: skip
        with pytest.raises(MedpipeError, match="QIDO-RS of study 1.2.3: .* answered HTTP 503"):
            pull_study(load_settings(routing), DicomWebService(url), "1.2.3")
    finally:
        server.shutdown()
    assert seen == [
        ("POST", "/dicom-web/studies", "Bearer t0ken"),
        ("POST", "/dicom-web/studies", None),
        ("GET", "/dicom-web/studies/1.2.3/instances", "Basic bWVkcGlwZTpwdw=="),  # medpipe:pw
    ]


def test_routing_destination_is_a_dicom_peer_or_a_dicomweb_service(tmp_path: Path, monkeypatch: Any) -> None:
    from medpipe.serve.pull import parse_peer
    from medpipe.serve.routing import DicomWebService, Peer, load_settings

    def destination(value: dict[str, Any]) -> Any:
        path = tmp_path / "routing.json"
        path.write_text(json.dumps({"node": {"work_dir": str(tmp_path)}, "destination": value}))
        return load_settings(path).destination

    # the existing kind stays valid
    assert destination({"ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}) == Peer("ORTHANC", "127.0.0.1", 4242)
    web = destination({"dicomweb": "http://127.0.0.1:8042/dicom-web/", "timeout_s": 5})
    assert web == DicomWebService("http://127.0.0.1:8042/dicom-web", None, 5.0)
    monkeypatch.setenv("PACS_PASSWORD", "s3cret")
    web = destination(
        {"dicomweb": "https://pacs/dicom-web", "auth": {"username": "medpipe", "password_env": "PACS_PASSWORD"}}
    )
    assert (web.auth.username, web.auth.password) == ("medpipe", "s3cret") and "s3cret" not in repr(web)

    problems = {
        "a dicomweb destination takes no ae_title, host or port": {"dicomweb": "http://x/dicom-web", "port": 4242},
        "auth belongs to a dicomweb destination": {"ae_title": "A", "host": "h", "port": 1, "auth": {"token_env": "T"}},
        "destination needs ae_title, host and port": {"ae_title": "A"},
        "destination.dicomweb must be an http:// or https:// URL": {"dicomweb": "ftp://x"},
        "destination.auth needs username and one of password / password_env": {"dicomweb": "http://x",
                                                                               "auth": {"username": "u"}},
        "environment variable NOT_SET_ANYWHERE is not set": {"dicomweb": "http://x",
                                                             "auth": {"token_env": "NOT_SET_ANYWHERE"}},
        "unknown destination setting(s) ['colour']": {"dicomweb": "http://x", "colour": "blue"},
    }  # fmt: skip
    for message, value in problems.items():
        with pytest.raises(MedpipeError) as caught:
            destination(value)
        assert message in str(caught.value), (value, str(caught.value))

    assert parse_peer("dicomweb+http://127.0.0.1:8042/dicom-web/") == DicomWebService("http://127.0.0.1:8042/dicom-web")
    assert parse_peer("ORTHANC@127.0.0.1:4242") == Peer("ORTHANC", "127.0.0.1", 4242)
    with pytest.raises(MedpipeError, match="dicomweb\\+http://HOST:PORT/PATH"):
        parse_peer("dicomweb+ftp://x")
