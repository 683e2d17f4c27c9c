"""`medpipe serve`, the DICOM node, against a real PACS (Orthanc): series pushed from Orthanc come back as DICOM-SEG
and structured reports; faults (SIGKILL, destination down, refused AEs and SOP classes, a missing slice, two series
at once) end as docs/serve.md says. Models are the bundles' own networks with seeded weights: the tests check the
DICOM flow and that the SR holds the run's numbers, not accuracy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch
from orthanc import ORTHANC, Orthanc, free_port
from pydicom.uid import generate_uid

from conftest import REPO, real_dataset
from medpipe.errors import MedpipeError

# RIDER's PatientName is a TCIA UID; highdicom warns about it in every SR/SEG it writes
pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent the intended person name")
RIDER = "dicom/rider_pilot_chest_ct_0117"
WAIT_S = 180


# ------------------------------------------------------------------------------------------------------- helpers
def make_checkpoint(bundle: str, path: Path, seed: int = 0) -> Path:
    """The bundle's network as its train.json defines it, seeded, saved as a state dict."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(REPO / "bundles" / bundle / "configs" / "train.json")])
    parser["bundle_root"] = str(REPO / "bundles" / bundle)
    torch.manual_seed(seed)
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    return path


def rider_datasets(first: int = 0, count: int | None = None, drop: int | None = None) -> list[pydicom.Dataset]:
    """RIDER slices (sorted by file name) re-labelled with fresh study/series/instance UIDs, so that every test
    sends a series Orthanc and the node have not seen before."""
    files = sorted(real_dataset(RIDER).glob("*.dcm"))
    files = files[first : None if count is None else first + count]
    study, series = generate_uid(), generate_uid()
    out = []
    for i, path in enumerate(files):
        if i == drop:
            continue
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        out.append(ds)
    return out


def wrap_image(image_path: Path, modality: str, body_part: str, photometric: str = "MONOCHROME2",
               bits: int = 12) -> pydicom.Dataset:  # fmt: skip
    """A picture as a single-frame DICOM image (CR / DX / MR) with a full-range window, stored at `bits` bits;
    MONOCHROME1 stores the inverted values, so a correct reader sees the same picture in both."""
    from PIL import Image
    from pydicom.dataset import FileMetaDataset

    grey = np.asarray(Image.open(image_path).convert("L"), dtype=np.uint16)
    top = (1 << bits) - 1
    stored = (grey.astype(np.uint32) * top // 255).astype(np.uint16)
    if photometric == "MONOCHROME1":
        stored = (top - stored).astype(np.uint16)
    sop_class = {
        "CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1", "MR": "1.2.840.10008.5.1.4.1.1.4"
    }[modality]  # fmt: skip
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Serve", "SERVE001", "", "O"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20200101", "120000", "1", ""
    ds.ReferringPhysicianName, ds.Manufacturer = "", "medpipe-test"
    ds.Modality, ds.BodyPartExamined, ds.SeriesNumber, ds.InstanceNumber = modality, body_part, 1, 1
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.WindowCenter, ds.WindowWidth = (top + 1) / 2, top + 1
    ds.PixelData = stored.tobytes()
    return ds


def write_routing(
    path: Path,
    ckpts: dict[str, Path],
    port: int,
    dest: tuple[str, int] | None,
    cxr_route: dict | None = None,
    **node: Any,
) -> Path:
    routing = {
        "node": {"ae_title": "MEDPIPE", "port": port, "work_dir": str(path.parent / "node"), "quiet_seconds": 1,
                 "backoff_s": 0.5, "backoff_max_s": 2, **node},
        "routes": [
            {"name": "chest_ct", "task": "ct_segmentation", "bundle": "covid_ct_seg", "checkpoints": [str(ckpts["ct"])],
             "modality": "CT", "body_part": ["CHEST", "LUNG", "THORAX", ""]},
            {"name": "chest_xray", "task": "classification", "bundle": "covid_cxr_cls",
             "checkpoints": [str(ckpts["cxr"])], "modality": ["CR", "DX"], "body_part": ["CHEST"], **(cxr_route or {})},
            {"name": "brain_mri", "task": "classification", "bundle": "brain_tumor_cls",
             "checkpoints": [str(ckpts["brain"])], "modality": "MR", "body_part": ["BRAIN", "HEAD"]},
        ],
    }  # fmt: skip
    if dest is not None:
        routing["destination"] = {"ae_title": dest[0], "host": "127.0.0.1", "port": dest[1]}
    path.write_text(json.dumps(routing, indent=2))
    return path


class RunningNode:
    """A Node serving in a background thread of the test process."""

    def __init__(self, routing: Path, **overrides: Any) -> None:
        from medpipe.serve.routing import load_settings
        from medpipe.serve.worker import Node

        self.node = Node(load_settings(routing, **overrides))
        self.thread = threading.Thread(target=self.node.serve_forever, daemon=True)
        self.thread.start()
        deadline = time.time() + 120  # loading the routes' models (and a first fit of the input guard) takes a while
        while self.node.scp.server is None and time.time() < deadline:
            time.sleep(0.05)

    def wait(self, done: int = 1, states: tuple[str, ...] = ("done",), timeout_s: float = WAIT_S) -> list[Any]:
        """Jobs in `states` once there are `done` of them; AssertionError with the queue's state otherwise."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            jobs = [j for j in self.node.queue.jobs() if j.state in states]
            if len(jobs) >= done:
                return jobs
            ended = [j for j in self.node.queue.jobs() if j.state in ("failed", "skipped") and j.state not in states]
            if ended:
                raise AssertionError(f"job {ended[0].id} {ended[0].state}: {ended[0].reason}")
            time.sleep(0.2)
        raise AssertionError(f"after {timeout_s}s: {[(j.id, j.state, j.reason) for j in self.node.queue.jobs()]}")

    def stop(self) -> None:
        self.node.stopping.set()
        self.thread.join(30)


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    if ORTHANC is None:
        pytest.skip("Orthanc is not installed: apt-get install orthanc (as .ci/run does)")
    real_dataset(RIDER)
    orthanc = Orthanc(tmp_path_factory.mktemp("orthanc"), medpipe_port=free_port())
    yield orthanc
    orthanc.stop()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ckpts")
    return {
        "ct": make_checkpoint("covid_ct_seg", folder / "ct.pt"),
        "cxr": make_checkpoint("covid_cxr_cls", folder / "cxr.pt"),
        "brain": make_checkpoint("brain_tumor_cls", folder / "brain.pt"),
    }


@pytest.fixture
def node_factory(tmp_path: Path, pacs: Orthanc, ckpts: dict[str, Path]) -> Iterator[Any]:
    started: list[RunningNode] = []

    def start(
        dest: tuple[str, int] | None = ("ORTHANC", -1), cxr_route: dict | None = None, **node: Any
    ) -> RunningNode:
        dest = (dest[0], pacs.dicom_port if dest[1] == -1 else dest[1]) if dest else None
        routing = write_routing(tmp_path / "routing.json", ckpts, pacs.medpipe_port, dest, cxr_route, **node)
        started.append(RunningNode(routing))
        return started[-1]

    yield start
    for running in started:
        running.stop()


# --------------------------------------------------------------------------------------------------------- tests
def test_ct_series_from_orthanc_comes_back_as_seg_and_sr(pacs: Orthanc, node_factory: Any) -> None:
    import highdicom as hd

    from medpipe.serve.results import read_findings, read_measurements

    source = rider_datasets()
    series_id = pacs.upload(source)
    node = node_factory()
    pacs.push_to_medpipe(series_id)
    (job,) = node.wait()
    assert job.route == "chest_ct" and job.n_instances == len(source)
    seg_series = pacs.wait_for_modality(series_id, "SEG")
    sr_series = pacs.wait_for_modality(series_id, "SR")
    (seg,) = pacs.instance_files(seg_series[0])
    (sr,) = pacs.instance_files(sr_series[0])

    # the SEG references the source series, one frame per slice and segment
    source_uids = {str(ds.SOPInstanceUID) for ds in source}
    assert seg.StudyInstanceUID == source[0].StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source[0].SeriesInstanceUID
    referenced = {str(r.ReferencedSOPInstanceUID) for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced <= source_uids and referenced
    seg_obj = hd.seg.Segmentation.from_dataset(seg)
    assert [s.segment_label for s in seg_obj.SegmentSequence] == ["lung (not infected)", "COVID-19 infection"]
    out_dir = node.node.jobs_dir / str(job.id) / "out"
    report = json.loads((out_dir / "report.json").read_text())
    entry = report["volumes"][0]
    mask = np.asarray(__import__("nibabel").load(out_dir / entry["files"]["seg"]).dataobj)
    assert mask.shape[2] == len(source)
    assert int(seg.NumberOfFrames) == len(source) * 2
    for frame in seg.PerFrameFunctionalGroupsSequence:
        assert frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID in source_uids

    # the SR holds the run's report.json numbers and references the source series
    assert sr.StudyInstanceUID == source[0].StudyInstanceUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert {e.SeriesInstanceUID for e in evidence} == {source[0].SeriesInstanceUID}
    path = out_dir / "from_orthanc_sr.dcm"
    sr.save_as(path)
    values = read_measurements(path)
    assert values["lung"]["Volume"] == pytest.approx(entry["lung_volume_ml"])
    assert values["infection"]["Volume"] == pytest.approx(entry["infection_volume_ml"])
    if entry["infection_percent_of_lung"] is not None:
        percent = values["infection"]["Infection volume as percent of lung volume"]
        assert percent == pytest.approx(entry["infection_percent_of_lung"])
    # "no infection detected" in words when report.json says so (issue #31); an infected volume's SR as before
    assert read_findings(path)["findings"] == ([] if entry["infection_detected"] else [entry["finding"]])
    assert set(job.timings) >= {"transfer_s", "queue_s", "model_s", "writing_s", "send_s"}


def cxr_picture() -> Path:
    return sorted((real_dataset("covid_cxr") / "images").glob("*.jpg"))[0]


def sr_values(pacs: Orthanc, series_id: str, tmp_path: Path) -> dict[str, dict[str, float]]:
    from medpipe.serve.results import read_measurements

    (sr_id,) = pacs.wait_for_modality(series_id, "SR")
    (sr,) = pacs.instance_files(sr_id)
    path = tmp_path / f"{sr_id}.dcm"
    sr.save_as(path)
    return read_measurements(path)


def test_cxr_monochrome1_and_2_and_brain_mr_come_back_as_probability_srs(
    pacs: Orthanc, node_factory: Any, tmp_path: Path
) -> None:
    picture = cxr_picture()
    cases = {
        "cr_mono2_12bit": wrap_image(picture, "CR", "CHEST", "MONOCHROME2", bits=12),
        "dx_mono1_16bit": wrap_image(picture, "DX", "CHEST", "MONOCHROME1", bits=16),
        "mr_brain": wrap_image(sorted((real_dataset("brain_mri_yes_no") / "yes").glob("*.jpg"))[0], "MR", "BRAIN"),
        "mr_knee": wrap_image(picture, "MR", "KNEE"),
    }
    series = {name: pacs.upload([ds]) for name, ds in cases.items()}
    node = node_factory()
    for series_id in series.values():
        pacs.push_to_medpipe(series_id)
    node.wait(4, states=("done", "skipped"))
    (skipped,) = node.node.queue.jobs("skipped")
    assert "no route matches" in skipped.reason and "body part 'KNEE'" in skipped.reason

    values = {name: sr_values(pacs, series[name], tmp_path)["classification"] for name in series if name != "mr_knee"}
    # both photometric interpretations read as the same picture: the probabilities of the original JPEG
    # (up to 12-bit quantisation); a reader that ignored MONOCHROME1 would see the negative, which scores apart
    from PIL import Image, ImageOps

    model = node.node.models["chest_xray"]
    reference = model.run(picture)
    ImageOps.invert(Image.open(picture).convert("L")).save(tmp_path / "negative.png")
    negative = model.run(tmp_path / "negative.png")
    assert max(abs(negative[c] - reference[c]) for c in reference) > 0.01
    for name in ("cr_mono2_12bit", "dx_mono1_16bit"):
        assert set(values[name]) == {f"Probability of {c}" for c in ("covid19", "pneumonia", "normal")}
        for cls, p in reference.items():
            assert values[name][f"Probability of {cls}"] == pytest.approx(p, abs=1e-3), name
    assert set(values["mr_brain"]) == {"Probability of no", "Probability of yes"}
    assert sum(values["mr_brain"].values()) == pytest.approx(1.0, abs=1e-5)
    (sr_id,) = pacs.wait_for_modality(series["mr_brain"], "SR")
    (sr,) = pacs.instance_files(sr_id)
    text = " ".join(str(element.value) for element in sr.iterall() if element.keyword == "TextValue")
    version = json.loads((REPO / "bundles/brain_tumor_cls/configs/metadata.json").read_text())["version"]
    assert "brain_tumor_cls/paper_cnn" in text and version in text


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_sigkill_after_receiving_resumes_and_delivers_once(
    pacs: Orthanc, ckpts: dict[str, Path], tmp_path: Path
) -> None:
    routing = write_routing(tmp_path / "routing.json", ckpts, pacs.medpipe_port, ("ORTHANC", pacs.dicom_port))
    source = rider_datasets(count=16)
    series_id = pacs.upload(source)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    server = subprocess.Popen([sys.executable, "-m", "medpipe", "serve", str(routing), "--quiet_seconds", "600"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.time() + 180  # a first fit of the input guard may be part of the start
        while not _listening(pacs.medpipe_port):
            assert server.poll() is None and time.time() < deadline, "medpipe serve did not start listening"
            time.sleep(0.2)
        pacs.push_to_medpipe(series_id)  # synchronous: every instance acknowledged when it returns
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait(10)
    from medpipe.serve.status import node_status

    assert node_status(tmp_path / "node")["instances_not_in_a_job"] == len(source)
    node = RunningNode(routing)
    try:
        (job,) = node.wait()
        assert job.n_instances == len(source)
        pacs.push_to_medpipe(series_id)  # the same series again: not processed twice
        time.sleep(3)
        assert len(node.node.queue.jobs()) == 1
    finally:
        node.stop()
    assert len(pacs.wait_for_modality(series_id, "SEG")) == 1
    assert len(pacs.instance_files(pacs.wait_for_modality(series_id, "SEG")[0])) == 1


def test_destination_down_waits_then_delivers(pacs: Orthanc, node_factory: Any, tmp_path: Path) -> None:
    from pynetdicom import AE, evt

    from medpipe.serve.status import format_status, node_status

    port = free_port()
    node = node_factory(dest=("LATEPACS", port))
    series_id = pacs.upload([wrap_image(cxr_picture(), "CR", "CHEST")])
    pacs.push_to_medpipe(series_id)
    (job,) = node.wait(states=("send_pending",))
    deadline = time.time() + 30
    while node.node.queue.get(job.id).send_attempts < 2:
        assert time.time() < deadline, "no retry of the send"
        time.sleep(0.2)
    status = node_status(node.node.work_dir)
    assert status["counts"]["send_pending"] == 1 and status["waiting_to_send"][0]["job"] == job.id
    assert "waiting to send: job" in format_status(status)

    received: list[pydicom.Dataset] = []
    ae = AE(ae_title="LATEPACS")
    ae.add_supported_context("1.2.840.10008.5.1.4.1.1.88.33")  # Comprehensive SR
    handlers = [(evt.EVT_C_STORE, lambda event: received.append(event.dataset) or 0x0000)]
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    try:
        node.wait()
    finally:
        server.shutdown()
    assert [ds.Modality for ds in received] == ["SR"]


def test_allow_list_refuses_unknown_calling_ae_and_unsupported_sop_class(node_factory: Any) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import SecondaryCaptureImageStorage, Verification

    node = node_factory(allowed_calling_aes=["ORTHANC"])
    port = node.node.settings.port

    intruder = AE(ae_title="INTRUDER")
    intruder.add_requested_context(Verification)
    assoc = intruder.associate("127.0.0.1", port, ae_title="MEDPIPE")
    assert assoc.is_rejected

    known = AE(ae_title="ORTHANC")
    known.add_requested_context(Verification)
    known.add_requested_context(SecondaryCaptureImageStorage)
    assoc = known.associate("127.0.0.1", port, ae_title="MEDPIPE")
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
        assert [c.abstract_syntax for c in assoc.accepted_contexts] == [Verification]
        assert SecondaryCaptureImageStorage in [c.abstract_syntax for c in assoc.rejected_contexts]
    finally:
        assoc.release()
    assert node.node.queue.pending_instances() == 0


def test_missing_slice_fails_with_the_ingest_message_in_status(pacs: Orthanc, node_factory: Any) -> None:
    from medpipe.serve.status import format_status, node_status

    node = node_factory()
    series_id = pacs.upload(rider_datasets(count=12, drop=6))
    pacs.push_to_medpipe(series_id)
    (job,) = node.wait(states=("failed",))
    assert "1 missing slice(s)" in job.reason
    assert "1 missing slice(s)" in format_status(node_status(node.node.work_dir))
    cli = [sys.executable, "-m", "medpipe", "serve", "status"]
    shown = subprocess.run([*cli, str(node.node.work_dir)], capture_output=True, text=True, cwd=REPO, check=True)
    assert "failed 1" in shown.stdout and "1 missing slice(s)" in shown.stdout
    absent = subprocess.run([*cli, str(node.node.work_dir / "absent")], capture_output=True, text=True, cwd=REPO)
    assert absent.returncode == 2 and absent.stderr.startswith("medpipe error: no DICOM node state")


def test_two_series_at_once_both_complete(pacs: Orthanc, node_factory: Any) -> None:
    node = node_factory()
    ct_series = pacs.upload(rider_datasets(first=40, count=12))
    cxr_series = pacs.upload([wrap_image(cxr_picture(), "DX", "CHEST", "MONOCHROME1")])
    pacs.push_to_medpipe(ct_series, asynchronous=True)
    pacs.push_to_medpipe(cxr_series, asynchronous=True)
    jobs = node.wait(2)
    assert sorted(j.route for j in jobs) == ["chest_ct", "chest_xray"]
    assert pacs.wait_for_modality(ct_series, "SEG") and pacs.wait_for_modality(cxr_series, "SR")


def test_pull_fetches_a_study_by_c_get_into_the_queue(pacs: Orthanc, node_factory: Any) -> None:
    from medpipe.serve.pull import parse_peer, pull_study

    node = node_factory()
    image = wrap_image(cxr_picture(), "CR", "CHEST")
    series_id = pacs.upload([image])
    source = parse_peer(f"ORTHANC@127.0.0.1:{pacs.dicom_port}")
    assert pull_study(node.node.settings, source, str(image.StudyInstanceUID)) == 1
    (job,) = node.wait()
    assert job.route == "chest_xray" and pacs.wait_for_modality(series_id, "SR")
    with pytest.raises(MedpipeError, match="AE_TITLE@HOST:PORT"):
        parse_peer("ORTHANC:4242")


def test_gradcam_overlay_comes_back_as_secondary_capture_when_asked(pacs: Orthanc, node_factory: Any) -> None:
    node = node_factory(cxr_route={"gradcam": True})
    image = wrap_image(cxr_picture(), "CR", "CHEST", "MONOCHROME1")
    series_id = pacs.upload([image])
    pacs.push_to_medpipe(series_id)
    (job,) = node.wait()
    assert [Path(p).name for p in job.results] == [
        f"{image.SOPInstanceUID}_sr.dcm",
        f"{image.SOPInstanceUID}_gradcam.dcm",
    ]
    (sc_series,) = pacs.wait_for_modality(series_id, "OT")
    (sc,) = pacs.instance_files(sc_series)
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and sc.StudyInstanceUID == image.StudyInstanceUID
    assert (sc.Rows, sc.Columns, sc.PhotometricInterpretation) == (image.Rows, image.Columns, "RGB")
    rgb = sc.pixel_array.astype(int)
    assert rgb.shape == (image.Rows, image.Columns, 3) and np.ptp(rgb[..., 0] - rgb[..., 2]) > 50  # colour on it


# ------------------------------------------------------------------------------------------ settings, no network
def test_routing_file_errors_are_one_line(tmp_path: Path) -> None:
    from medpipe.serve.routing import load_settings

    with pytest.raises(MedpipeError, match="not found"):
        load_settings(tmp_path / "absent.yaml")
    bad = tmp_path / "routing.yaml"
    bad.write_text("routes:\n  - {name: ct, bundle: covid_ct_seg, task: segment, modality: CT, checkpoints: [x.pt]}\n")
    with pytest.raises(MedpipeError, match="task must be one of"):
        load_settings(bad)
    bad.write_text("routes:\n  - {name: ct, bundle: covid_ct_seg, task: ct_segmentation, modality: CT, "
                   "checkpoints: [x.pt]}\n")  # fmt: skip
    with pytest.raises(MedpipeError, match="checkpoint .* not found"):
        load_settings(bad)
    bad.write_text(f"routes:\n  - {{name: ct, bundle: covid_ct_seg, task: ct_segmentation, modality: CT, "
                   f"checkpoints: [{bad}], gradcam: true}}\n")  # fmt: skip
    with pytest.raises(MedpipeError, match="only classification routes"):
        load_settings(bad)
    bad.write_text("node: {colour: blue}\n")
    with pytest.raises(MedpipeError, match="unknown node setting"):
        load_settings(bad)


def test_queue_processes_a_series_once_and_resumes_running_jobs(tmp_path: Path) -> None:
    from medpipe.serve.queue import JobQueue

    queue = JobQueue(tmp_path / "q.sqlite")
    meta = {"series_instance_uid": "1.2.3", "modality": "CT"}
    for sop in ("1.2.3.1", "1.2.3.2"):
        queue.add_instance({**meta, "sop_instance_uid": sop}, tmp_path / sop)
    assert queue.collect_quiet_series(0.0)[0][0] == 1
    for sop in ("1.2.3.2", "1.2.3.1"):  # the same series again, in another order
        queue.add_instance({**meta, "sop_instance_uid": sop}, tmp_path / sop)
    assert queue.collect_quiet_series(0.0)[0][0] is None
    queue.add_instance({**meta, "sop_instance_uid": "1.2.3.2"}, tmp_path / "x")  # part of it again
    assert queue.collect_quiet_series(0.0)[0][0] is None
    queue.add_instance({**meta, "sop_instance_uid": "1.2.3.3"}, tmp_path / "y")  # a new instance: the whole series
    assert queue.collect_quiet_series(0.0)[0][0] == 2  # again, replacing job 1 (never a one-instance job)
    assert queue.get(2).n_instances == 3 and queue.get(1).state == "superseded"
    job = queue.claim_next()
    assert job is not None and job.id == 2 and job.state == "running" and job.attempts == 1
    queue.close()
    queue = JobQueue(tmp_path / "q.sqlite")  # as after a SIGKILL
    assert queue.recover(max_attempts=2) == 1 and queue.get(2).state == "received"
    assert queue.claim_next().id == 2
    assert queue.recover(max_attempts=2) == 1 and queue.get(2).state == "failed"
    assert "interrupted 2 times" in queue.get(2).reason
