"""Declared, typed bundle parameters (medpipe.bundle.parameters): coercion, one-line refusals from both entry points,
the string-boolean regressions, every bundle holding the shared parameters, `medpipe run … --help`, and no config
block repeated between bundles."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BUNDLES, REPO
from medpipe.bundle.config import config_files
from medpipe.bundle.parameters import Parameter, declared_parameters, shared_parameters
from medpipe.errors import MedpipeError

# one wrong value per declared type, and what the one line must say
BAD_VALUES = {
    "bool": ("maybe", "true or false"),
    "int": ("3.5", "a whole number"),
    "float": ("fast", "a number"),
    "str": (["a", "b"], "a single value"),
    "path": (None, "a value"),
    "dir": ("/no/such/folder", "an existing folder"),
    "file": ("/no/such/file.pt", "an existing file"),
    "files": ("/no/such/a.pt,/no/such/b.pt", "existing files"),
    "paths": ("/no/such/series,/no/such/labels.csv", "existing files or folders"),
    "json": ("{'lung': ", "a JSON object or list"),
}


def test_every_declared_type_has_a_bad_value_case() -> None:
    from medpipe.bundle.parameters import TYPES

    used = {p.type for b in BUNDLES for p in declared_parameters(b).values()}
    assert used <= set(TYPES) == set(BAD_VALUES)


@pytest.mark.parametrize("kind", sorted(BAD_VALUES))
def test_bad_value_of_each_type_is_one_line(kind: str) -> None:
    value, expected = BAD_VALUES[kind]
    with pytest.raises(MedpipeError) as err:
        Parameter("x", kind, "what x is").coerce(value)
    assert expected in str(err.value) and "\n" not in str(err.value) and "--x" in str(err.value)


@pytest.mark.parametrize(
    ("kind", "given", "typed"),
    [("bool", "false", False), ("bool", "True", True), ("bool", 0, False), ("int", "3", 3), ("int", "-1", -1),
     ("int", 4.0, 4), ("float", "1e-3", 0.001), ("float", 2, 2.0), ("str", 7, "7"), ("files", "", []),
     ("files", None, [])],
)  # fmt: skip
def test_values_are_coerced(kind: str, given: object, typed: object) -> None:
    assert Parameter("x", kind, "help").coerce(given) == typed


def test_ranges_and_choices() -> None:
    assert Parameter("e", "int", "h", min=1).coerce("1") == 1
    with pytest.raises(MedpipeError, match=">= 1"):
        Parameter("e", "int", "h", min=1).coerce("0")
    with pytest.raises(MedpipeError, match="one of fp32, bf16"):
        Parameter("p", "str", "h", choices=("fp32", "bf16")).coerce("fp64")
    assert Parameter("c", "file", "h", nullable=True).coerce("none") is None
    with pytest.raises(MedpipeError, match="cannot be empty"):
        Parameter("c", "file", "h").coerce(None)


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_every_bundle_defines_the_shared_parameters(bundle: Path) -> None:
    config = json.loads((bundle / "configs" / "train.json").read_text())
    missing = sorted(set(shared_parameters()) - set(config))
    assert not missing, f"{bundle.name} lacks shared parameters {missing}"
    own = json.loads((bundle / "configs" / "parameters.json").read_text())
    for name in own:  # a bundle declares only what its configs define
        assert any(name in json.loads(Path(f).read_text()) for f in (bundle / "configs").glob("*.json")), name


def _workflow(bundle: Path, job: str = "train", **overrides: object):  # noqa: ANN202
    """A bundle workflow whose `initialize` runs only the configs' first step (typed parameters), not training."""
    from monai.bundle import ConfigWorkflow

    overrides["initialize"] = ["$medpipe.bundle.config.check_overrides([])"]
    workflow = ConfigWorkflow(config_file=config_files(bundle, job), workflow_type=None, **overrides)
    workflow.initialize()
    return workflow


def test_channels_last_false_from_the_command_line_is_off(tmp_path: Path) -> None:
    """fire passes `--channels_last false` as 'false'; raw, `if @channels_last` was True (the old bug)."""
    bundle = REPO / "bundles" / "brain_tumor_cls"
    workflow = _workflow(bundle, channels_last="false", dataset_dir=str(tmp_path))
    assert workflow.parser.get_parsed_content("channels_last") is False
    assert workflow.parser.get_parsed_content("inferer").channels_last is False


def test_batch_dice_false_from_the_command_line_is_off(tmp_path: Path) -> None:
    bundle = REPO / "bundles" / "covid_ct_seg"
    workflow = _workflow(bundle, batch_dice="false", dataset_dir=str(tmp_path))
    assert workflow.parser.get_parsed_content("loss").base.dice.batch is False
    workflow = _workflow(bundle, batch_dice="true", dataset_dir=str(tmp_path))
    assert workflow.parser.get_parsed_content("loss").base.dice.batch is True


def test_class_weighted_loss_false_is_off(tmp_path: Path) -> None:
    bundle = REPO / "bundles" / "covid_cxr_cls"
    workflow = _workflow(bundle, class_weighted_loss="false", dataset_dir=str(tmp_path))
    assert workflow.parser.get_parsed_content("class_weighted_loss") is False


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--epochs", "abc"], "--epochs 'abc': expected a whole number"),
     (["--learning_rate", "-1"], "--learning_rate -1: expected a value >= 0"),
     (["--precision", "fp64"], "expected one of fp32, bf16, fp16"),
     (["--resume", "perhaps"], "expected true or false"),
     (["--fold", "9"], "--fold 9: expected -1 (train on everything) or 0..4"),
     (["--dataset_dir", "/no/such/dir"], "expected an existing folder")],
)  # fmt: skip
def test_monai_bundle_run_refuses_bad_values_in_one_line(args: list[str], message: str) -> None:
    config = REPO / "bundles" / "brain_tumor_cls" / "configs" / "train.json"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(config), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("medpipe error:")]
    assert proc.returncode != 0 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_medpipe_run_refuses_bad_values_before_parsing() -> None:
    from medpipe.cli import main

    assert main(["run", "covid_cxr_cls", "train", "--task", "4class"]) == 2
    assert main(["run", "covid_ct_seg", "train", "--batch_size", "0"]) == 2


def test_run_help_lists_the_declared_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    from medpipe.cli import main

    assert main(["run", "covid_ct_seg", "train", "--help"]) == 0
    out = capsys.readouterr().out
    for name in ("--batch_dice", "--channels_last", "--epochs", "--splits_file"):
        assert name in out
    line = next(ln for ln in out.splitlines() if ln.startswith("--batch_dice"))
    assert "bool" in line and "false" in line


# MONAI's engine components (`train#trainer`, `validate#evaluator`) are the zoo's skeleton: every bundle declares
# its own so that it reads and overrides like any zoo bundle; they are left out of the comparison
ENGINE_COMPONENTS = ('"trainer": {', '"evaluator": {')


def _blocks(path: Path, size: int) -> set[tuple[str, ...]]:
    kept, skip_indent = [], None
    for raw in path.read_text().splitlines():
        indent, line = len(raw) - len(raw.lstrip()), raw.strip()
        if skip_indent is not None:
            if indent == skip_indent and line in ("}", "},"):
                skip_indent = None
            continue
        if line in ENGINE_COMPONENTS:
            skip_indent = indent
            continue
        if line not in ("{", "}", "},", "[", "]", "],"):
            kept.append(line)
    return {tuple(kept[i : i + size]) for i in range(len(kept) - size + 1)}


def test_no_config_block_of_ten_lines_is_repeated_between_bundles() -> None:
    """What bundles share is written once (medpipe/bundle/configs, medpipe.bundle.handlers), not copied."""
    # metadata.json describes each bundle for the zoo (its own network_data_format), so it is not config to share
    files = {
        b.name: sorted(p for p in (b / "configs").glob("*.json") if not p.is_symlink() and p.name != "metadata.json")
        for b in BUNDLES
    }
    seen: dict[tuple[str, ...], str] = {}
    for name, paths in files.items():
        for path in paths:
            for block in _blocks(path, 10):
                other = seen.setdefault(block, f"{name}/{path.name}")
                assert other.split("/")[0] == name, f"{path} repeats a block of {other}: {block}"


def test_shared_files_are_links_to_one_copy() -> None:
    shared = REPO / "medpipe" / "bundle" / "configs"
    for bundle in BUNDLES:
        for name in ("multi_gpu_train.json", "logging.conf"):
            assert (bundle / "configs" / name).resolve() == (shared / name).resolve()
