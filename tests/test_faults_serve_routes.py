"""Routing faults of the DICOM node (docs/serve.md): the routing file checked whole against a schema, unique route
names and models that belong to their route, the called AE title, a pull in which an instance failed, and results
the node doubts (wrong kind of image, no body in a CT, an implausible lung volume) refused or sent with a warning,
as the route says. The node tests use the real node over real DICOM associations (pynetdicom as the sending PACS)
and the bundles' own networks with seeded weights; the pull test uses a real Orthanc."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pydicom
import pytest
from orthanc import ORTHANC, Orthanc, free_port
from test_serve import RIDER, RunningNode, cxr_picture, make_checkpoint, rider_datasets, wrap_image

from conftest import real_dataset
from medpipe.errors import MedpipeError

pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent the intended person name")


# ------------------------------------------------------------------------------------------------------- helpers
def write(path: Path, routing: dict[str, Any]) -> Path:
    path.write_text(json.dumps(routing, indent=2))
    return path


def route(name: str, task: str, bundle: str, ckpt: Path, modality: Any, **more: Any) -> dict[str, Any]:
    return {"name": name, "task": task, "bundle": bundle, "checkpoints": [str(ckpt)], "modality": modality, **more}


def c_store(port: int, datasets: list[pydicom.Dataset], called: str = "MEDPIPE") -> list[int]:
    """Send `datasets` to the node as the PACS would (C-STORE over one association); the statuses."""
    from pynetdicom import AE

    ae = AE(ae_title="ORTHANC")
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, [str(ds.file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, "the node refused the association"
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def sr_texts(path: Path) -> list[str]:
    return [str(e.value) for e in pydicom.dcmread(path).iterall() if e.keyword == "TextValue"]


def blank_ct(count: int = 3) -> list[pydicom.Dataset]:
    """RIDER slices with every pixel set to air (-1000 HU): a scan with no body in it."""
    out = []
    for ds in rider_datasets(first=40, count=count):
        pixels = ds.pixel_array
        pixels[...] = round((-1000.0 - float(ds.RescaleIntercept)) / float(ds.RescaleSlope))
        ds.PixelData = pixels.tobytes()
        out.append(ds)
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    real_dataset(RIDER)
    folder = tmp_path_factory.mktemp("ckpts")
    return {
        "ct": make_checkpoint("covid_ct_seg", folder / "ct.pt"),
        "cxr": make_checkpoint("covid_cxr_cls", folder / "cxr.pt"),
    }


@pytest.fixture
def node_with(tmp_path: Path) -> Iterator[Any]:
    started: list[RunningNode] = []

    def start(*routes: dict[str, Any]) -> RunningNode:
        node = {"ae_title": "MEDPIPE", "port": free_port(), "work_dir": str(tmp_path / "node"), "quiet_seconds": 0.5}
        started.append(RunningNode(write(tmp_path / "routing.json", {"node": node, "routes": list(routes)})))
        return started[-1]

    yield start
    for running in started:
        running.stop()


# ------------------------------------------------------------------------------------- the routing file (#1, #11)
def test_every_routing_file_error_is_reported_one_line_each_before_anything_loads(tmp_path: Path) -> None:
    from medpipe.serve.routing import load_settings

    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(b"")
    routing = {
        "node": {"ae_title": "A_NODE_TITLE_OF_17", "port": "abc", "host": ["127.0.0.1"], "allowed_calling_aes": "",
                 "quiet_seconds": -1, "max_attempts": 0},
        "destination": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": 99999},
        "routes": [route("ct", "ct_segmentation", "covid_ct_seg", ckpt, ["CT"], sop_class=["CT"], body_part=5,
                         on_implausible="hold")],
    }  # fmt: skip
    with pytest.raises(MedpipeError) as caught:
        load_settings(write(tmp_path / "routing.json", routing))
    lines = str(caught.value).splitlines()
    assert lines[0] == f"routing file '{tmp_path / 'routing.json'}' has {len(lines) - 1} problems:"
    expected = [
        "destination.port: 99999 is greater than the maximum of 65535",
        "node.ae_title: 'A_NODE_TITLE_OF_17' is too long",
        "node.allowed_calling_aes must be an AE title or a non-empty list of them, got ''",
        "node.host: ['127.0.0.1'] is not of type 'string'",
        "node.max_attempts: 0 is less than the minimum of 1",
        "node.port: 'abc' is not of type 'integer'",
        "node.quiet_seconds: -1 is less than or equal to the minimum of 0",
        "routes[0].body_part must be a body part or a non-empty list of them, got 5",
        "routes[0].on_implausible must be one of ['refuse', 'send'], got 'hold'",
        "routes[0].sop_class[0] must be a DICOM UID, got 'CT'",
    ]
    assert [line.strip() for line in lines[1:]] == expected

    # CLI overrides are checked the same way; a lone SOP class UID is one UID, not a list of its characters
    routing = {
        "routes": [route("cr", "classification", "covid_cxr_cls", ckpt, "CR", sop_class="1.2.840.10008.5.1.4.1.1.1")]
    }
    path = write(tmp_path / "routing.json", routing)
    with pytest.raises(MedpipeError, match=r"node.port: 99999 is greater than the maximum of 65535$"):
        load_settings(path, port=99999)
    assert load_settings(path).routes[0].sop_class == ("1.2.840.10008.5.1.4.1.1.1",)


def test_route_names_are_unique_and_a_model_serves_only_its_own_route(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two routes named alike once shared the first route's model: a chest X-ray got a brain-tumour SR."""
    import dataclasses

    from medpipe.serve import models
    from medpipe.serve.routing import load_settings
    from medpipe.serve.worker import Node

    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(b"")
    routing = {"routes": [route("images", "classification", "brain_tumor_cls", ckpt, "MR"),
                          route("images", "classification", "covid_cxr_cls", ckpt, ["CR", "DX"])]}  # fmt: skip
    with pytest.raises(MedpipeError, match=r"route name 'images' is used by routes \[0, 1\]: names must be unique"):
        load_settings(write(tmp_path / "routing.json", routing))

    routing["routes"][1]["name"] = "chest"
    settings = load_settings(write(tmp_path / "routing.json", routing), work_dir=str(tmp_path / "node"))
    brain, chest = settings.routes
    with pytest.raises(MedpipeError, match="route names must be unique"):  # also when built in code
        dataclasses.replace(settings, routes=(brain, dataclasses.replace(chest, name="images")))

    monkeypatch.setattr(models, "load_model", lambda r: SimpleNamespace(route=r))
    node = Node(settings)
    try:
        assert node._model(chest).route is chest and node._model(brain).route is brain
        node.models[chest.name] = node._model(brain)  # whatever put another route's model under this name
        assert node._model(chest).route is chest
    finally:
        node.queue.close()


# ----------------------------------------------------------------------------------------- called AE title (#13)
def test_an_association_to_another_called_ae_title_is_rejected(tmp_path: Path) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from medpipe.serve.queue import JobQueue
    from medpipe.serve.scp import StorageSCP

    queue = JobQueue(tmp_path / "q.sqlite")
    scp = StorageSCP(queue, tmp_path / "incoming", "MEDPIPE")
    port = free_port()
    scp.start("127.0.0.1", port)
    try:
        pacs = AE(ae_title="ORTHANC")
        pacs.add_requested_context(Verification)
        wrong = pacs.associate("127.0.0.1", port, ae_title="OTHERNODE")
        assert wrong.is_rejected
        right = pacs.associate("127.0.0.1", port, ae_title="MEDPIPE")
        assert right.is_established
        right.release()
    finally:
        scp.stop()
        queue.close()


# ---------------------------------------------------------------------------------------------------- pull (#10)
@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    if ORTHANC is None:
        pytest.skip("Orthanc is not installed: apt-get install orthanc (as .ci/run does)")
    orthanc = Orthanc(tmp_path_factory.mktemp("orthanc"), medpipe_port=free_port())
    yield orthanc
    orthanc.stop()


def test_pull_with_a_failed_instance_is_an_error_not_a_success(pacs: Orthanc, tmp_path: Path) -> None:
    from medpipe.serve.pull import parse_peer, pull_study
    from medpipe.serve.queue import JobQueue
    from medpipe.serve.routing import load_settings

    images = [wrap_image(cxr_picture(), "CR", "CHEST") for _ in range(5)]
    for ds in images[1:]:
        ds.StudyInstanceUID, ds.SeriesInstanceUID = images[0].StudyInstanceUID, images[0].SeriesInstanceUID
    images[2].SOPInstanceUID = images[2].file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.not-a-uid"
    pacs.upload(images)  # Orthanc keeps it; the node cannot file it (it names files by UID) and answers failure
    settings = load_settings(write(tmp_path / "routing.json", {"node": {"work_dir": str(tmp_path / "node")}}))
    source = parse_peer(f"ORTHANC@127.0.0.1:{pacs.dicom_port}")
    expected = r"status 0xB000: 1 instance\(s\) failed \(here: ValueError: SOPInstanceUID .*not a DICOM UID\); the 4"
    with pytest.raises(MedpipeError, match=expected):
        pull_study(settings, source, str(images[0].StudyInstanceUID))
    queue = JobQueue(settings.work_dir / "queue.sqlite")
    assert queue.pending_instances() == 4
    queue.close()


# ---------------------------------------------------------------------------- doubtful results (#6, #14, #15)
def test_wrong_kind_of_image_is_refused_or_sent_with_the_warning_as_the_route_says(
    ckpts: dict[str, Path], node_with: Any
) -> None:
    """A brain MRI slice labelled as a chest radiograph: the input guard's warning is acted on."""
    from medpipe.serve.status import format_status, node_status

    node = node_with(
        route("cxr_refuse", "classification", "covid_cxr_cls", ckpts["cxr"], "CR"),  # default: refuse
        route("cxr_send", "classification", "covid_cxr_cls", ckpts["cxr"], "DX", on_wrong_input="send"),
    )
    brain = sorted((real_dataset("brain_mri_yes_no") / "yes").glob("*.jpg"))[0]
    as_cr, as_dx, chest = (
        wrap_image(brain, "CR", "CHEST"),
        wrap_image(brain, "DX", "CHEST"),
        wrap_image(cxr_picture(), "DX", "CHEST"),
    )
    port = node.node.settings.port
    for ds in (as_cr, as_dx, chest):
        assert c_store(port, [ds]) == [0]
    node.wait(3, states=("done", "failed"))
    jobs = {j.series_instance_uid: j for j in node.node.queue.jobs()}

    refused = jobs[as_cr.SeriesInstanceUID]
    assert refused.state == "failed" and refused.results == []
    assert "refused by route 'cxr_refuse'" in refused.reason and "looks like a brain MRI" in refused.reason
    assert not list((node.node.jobs_dir / str(refused.id) / "out").glob("*.dcm"))

    sent = jobs[as_dx.SeriesInstanceUID]
    assert sent.state == "done"
    (sr,) = [Path(p) for p in sent.results]
    assert any("looks like a brain MRI" in t for t in sr_texts(sr))
    shown = format_status(node_status(node.node.work_dir))
    assert f"job {sent.id}: cxr_send: sent with a warning" in shown and f"failed: job {refused.id}" in shown

    clean = jobs[chest.SeriesInstanceUID]
    assert clean.state == "done" and not any("looks like" in t for t in sr_texts(Path(clean.results[0])))


def test_a_blank_ct_gets_no_measurements_and_an_implausible_lung_volume_is_flagged(
    ckpts: dict[str, Path], node_with: Any
) -> None:
    """An all-air series is refused (no SR with a lung volume the model invented); a lung volume outside the
    route's range is sent with the warning (on_implausible: send) or refused (refuse)."""
    from medpipe.serve.results import read_measurements

    ct = ckpts["ct"]
    # an upper bound of ~0 mL makes whatever lung the seeded network finds implausible
    node = node_with(
        route("ct_send", "ct_segmentation", "covid_ct_seg", ct, "CT", body_part="CHEST", lung_volume_ml=[0, 1e-6]),
        route("ct_refuse", "ct_segmentation", "covid_ct_seg", ct, "CT", body_part="LUNG", lung_volume_ml=[0, 1e-6],
              on_implausible="refuse"),
        route("ct", "ct_segmentation", "covid_ct_seg", ct, "CT"),
    )  # fmt: skip
    blank, send, refuse = blank_ct(), rider_datasets(first=40, count=4), rider_datasets(first=40, count=4)
    for ds in blank:
        ds.BodyPartExamined = "THORAX"
    for ds in send:
        ds.BodyPartExamined = "CHEST"
    for ds in refuse:
        ds.BodyPartExamined = "LUNG"
    port = node.node.settings.port
    for series in (blank, send, refuse):
        assert c_store(port, series) == [0] * len(series)
    node.wait(3, states=("done", "failed"))
    jobs = {j.series_instance_uid: j for j in node.node.queue.jobs()}

    empty = jobs[blank[0].SeriesInstanceUID]
    assert empty.state == "failed" and "no body in the volume" in empty.reason and empty.results == []
    assert not (node.node.jobs_dir / str(empty.id) / "out" / "measurements_sr.dcm").exists()

    sent = jobs[send[0].SeriesInstanceUID]
    assert sent.state == "done" and sent.route == "ct_send"
    sr = next(Path(p) for p in sent.results if p.endswith("measurements_sr.dcm"))
    assert read_measurements(sr)["lung"]["Volume"] > 0
    assert any("more than an adult chest holds" in t for t in sr_texts(sr))

    held = jobs[refuse[0].SeriesInstanceUID]
    assert held.state == "failed" and "refused by route 'ct_refuse'" in held.reason
    assert "more than an adult chest holds" in held.reason


def test_lung_volume_bounds_apply_to_series_that_cover_the_lungs() -> None:
    from medpipe.serve.models import CTSegmentationModel, judge
    from medpipe.serve.routing import Route

    ct = Route("ct", Path("b"), "ct_segmentation", (Path("m.pt"),), ("CT",))  # default bounds 1500-10000 mL
    model = SimpleNamespace(route=ct)

    def doubts(lung_ml: float, slices: int, spacing_mm: float) -> list[str]:
        return CTSegmentationModel.implausible(model, {"lung_volume_ml": lung_ml, "shape": [512, 512, slices],
                                                      "spacing_mm": [0.7, 0.7, spacing_mm]})  # fmt: skip

    assert doubts(4550, 79, 3.987) == []  # the shipped CIP chest CT's lung mask (ct_volumes/README.md)
    assert "below 1500 mL" in doubts(47, 300, 1.0)[0]  # a whole chest with a lung missing
    assert doubts(1200, 95, 0.8) == []  # RIDER-like: 76 mm of chest cannot hold the whole lung
    assert "above 10000 mL" in doubts(12000, 95, 0.8)[0]
    # the probe's RIDER SEG: 1216 mL, all of it on the patient's left (the right lung lost at the image edge)
    one_sided = {"lung_volume_ml": 1216, "lung_right_ml": 0.0, "lung_left_ml": 1216, "shape": [512, 512, 95],
                 "spacing_mm": [0.7, 0.7, 0.8]}  # fmt: skip
    assert "one side only (right 0 mL, left 1216 mL)" in CTSegmentationModel.implausible(model, one_sided)[0]
    both = {**one_sided, "lung_right_ml": 455.0, "lung_left_ml": 761.0}
    assert CTSegmentationModel.implausible(model, both) == []
    with pytest.raises(MedpipeError, match="refused by route 'ct'"):
        judge(Route("ct", Path("b"), "ct_segmentation", (), ("CT",), on_implausible="refuse"), [], ["too big"])
    assert judge(ct, [], ["too big"]) == ["too big"]


def test_lung_sides_are_split_at_the_body_midline() -> None:
    from medpipe.inference.ct_volume import lung_sides_ml
    from medpipe.io.dicom import Volume

    # LPS-stored DICOM as medpipe loads it: RAS affine with -x along voxel axis 0 (voxel i grows to the patient's right)
    affine = np.array([[-1.0, 0, 0, 31.5], [0, -1.0, 0, 31.5], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    hu = np.full((64, 64, 4), -1000, dtype=np.int16)
    hu[8:56, 16:48] = 40  # the body, centred: midline between voxels 31 and 32
    mask = np.zeros(hu.shape, dtype=np.uint8)
    mask[40:50, 20:30] = 1  # high i: x < midline, the patient's right
    mask[12:16, 20:30] = 2  # low i: the patient's left (infection counts as lung)
    right, left = lung_sides_ml(mask, Volume(hu, affine))
    assert right == pytest.approx(10 * 10 * 4 * 2.0 / 1000) and left == pytest.approx(4 * 10 * 4 * 2.0 / 1000)


def test_a_blank_volume_is_not_read_as_ct() -> None:
    from medpipe.io.dicom import Volume
    from medpipe.transforms.ct_intensity import check_axial_ct

    with pytest.raises(MedpipeError, match="no body in the volume"):
        check_axial_ct(Volume(np.full((64, 64, 3), -1000, dtype=np.int16), np.diag([0.7, 0.7, 1.0, 1.0])), "air")
