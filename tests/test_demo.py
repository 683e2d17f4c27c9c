"""`medpipe demo` (what `make main` runs): without MEDPIPE_DATA it says loudly that its data are synthetic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medpipe.cli.commands import demo_command


def test_demo_without_data_is_loudly_synthetic_and_writes_its_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv("MEDPIPE_DATA", raising=False)
    demo_command(out=str(tmp_path / "demo"), epochs=1)
    printed = capsys.readouterr().out
    assert "SYNTHETIC DATA" in printed and "| accuracy |" in printed
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert metrics["n"] > 0 and 0.0 <= metrics["metrics"]["accuracy"]["value"] <= 1.0
    assert (tmp_path / "demo" / "models" / "model.pt").stat().st_size > 0
