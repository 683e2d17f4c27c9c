"""Shared fixtures: where the real data is, and skipping (with the reason) when it is absent."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLES = sorted(p.parent.parent for p in (REPO / "bundles").glob("*/configs/metadata.json"))

# `make test` and CI export MEDPIPE_DATA; a bare `pytest` in a checkout beside ../shared finds the data too
if not os.environ.get("MEDPIPE_DATA") and (REPO.parent / "shared" / "data").is_dir():
    os.environ["MEDPIPE_DATA"] = str(REPO.parent / "shared" / "data")

os.environ.setdefault("OMP_NUM_THREADS", "2")
# caches written by the code under test (image hashes) go to a throw-away folder, not the user's ~/.cache
os.environ.setdefault("MEDPIPE_CACHE_DIR", tempfile.mkdtemp(prefix="medpipe-test-cache-"))


def real_dataset(name: str) -> Path:
    """Path of real data set `name`, or skip the test saying how to provide it."""
    root = os.environ.get("MEDPIPE_DATA")
    if not root or not (Path(root) / name).is_dir():
        pytest.skip(f"real data set '{name}' not found: set MEDPIPE_DATA to the folder holding {name}/")
    return Path(root) / name


@pytest.fixture
def brain_yes_no() -> Path:
    return real_dataset("brain_mri_yes_no")
