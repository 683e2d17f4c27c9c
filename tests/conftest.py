"""Shared fixtures: where the real data is, and skipping (with the reason) when it is absent."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLES = sorted(p.parent.parent for p in (REPO / "bundles").glob("*/configs/metadata.json"))

# `make test` and CI export MEDPIPE_DATA; a bare `pytest` in a checkout beside ../shared finds the data too
if not os.environ.get("MEDPIPE_DATA") and (REPO.parent / "shared" / "data").is_dir():
    os.environ["MEDPIPE_DATA"] = str(REPO.parent / "shared" / "data")

# one OpenMP thread per pytest-xdist worker (`make test` runs two): two workers of 2 threads each on 2 cores spin-wait
# and run several times slower than one
os.environ.setdefault("OMP_NUM_THREADS", "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2")
# caches written by the code under test (image hashes) go to a throw-away folder, not the user's ~/.cache
os.environ.setdefault("MEDPIPE_CACHE_DIR", tempfile.mkdtemp(prefix="medpipe-test-cache-"))


def real_dataset(name: str) -> Path:
    """Path of real data set `name`, or skip the test saying how to provide it."""
    root = os.environ.get("MEDPIPE_DATA")
    if not root or not (Path(root) / name).is_dir():
        pytest.skip(f"real data set '{name}' not found: set MEDPIPE_DATA to the folder holding {name}/")
    return Path(root) / name


def finish_or_kill(proc: subprocess.Popen, timeout_s: float, what: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a process started with `start_new_session=True`; past `timeout_s`, kill its
    whole process group (launchers' workers, Ray drivers' children too) and fail the test naming `what`."""
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{what} did not finish in {timeout_s:.0f}s (a hang?): {(out + err)[-3000:]}")
    return proc.returncode, out, err


@pytest.fixture
def brain_yes_no() -> Path:
    return real_dataset("brain_mri_yes_no")


# `make test` runs two xdist workers with `--dist loadfile`: a module runs whole on one worker, so its module-scoped
# fixtures (a real Orthanc, an MLflow server, a trained model, a CV run) are made once. xdist hands the modules out in
# collection order (`--no-loadscope-reorder`): the longest first (as measured with `--durations`), so that the short
# ones fill in around them.
SLOWEST_FIRST = (
    "test_seg_real_dicom", "test_distributed", "test_zoo", "test_seg_v2", "test_parameters", "test_cluster_ray",
    "test_serve", "test_viewer", "test_tracking", "test_bundles", "test_multinode", "test_faults_cv",
    "test_faults_tracking", "test_faults_serve_queue", "test_ct", "test_seg_postprocessing", "test_layouts_train",
    "test_ct_seg", "test_infection_free", "test_cxr", "test_bad_input", "test_cv", "test_faults_bundles",
    "test_dataset_check", "test_export", "test_dicomweb",
)  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: the order within a module is kept
