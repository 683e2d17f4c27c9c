"""Helpers the bundle configs call, and `medpipe run`, a checked front end to `python -m monai.bundle run`."""

from __future__ import annotations

import ast
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medpipe.bundle.parameters import _running_config, apply_to_running_config, coerce_values, declared_parameters
from medpipe.errors import MedpipeError, install_excepthook

logger = logging.getLogger(__name__)

# arguments of `monai.bundle run` itself, which are not config ids
RUN_ARGS = {"run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file"}
CONFIGS = {"train": ["train"], "evaluate": ["train", "evaluate"], "inference": ["train", "inference"]}
# a job's run id -> the key of the folder it writes, as the command line names it
JOB_OUTPUTS = {"training": "ckpt_dir", "evaluating": "output_dir", "inferring": "output_dir"}




def _argv_value(argv: Sequence[str], key: str) -> str | None:
    for i, token in enumerate(argv):
        if token == f"--{key}" and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith(f"--{key}="):
            return token.split("=", 1)[1]
    return None


def _as_file_list(value: str | Sequence[str]) -> list[str]:
    if isinstance(value, str):
        value = value.strip()
        if value.startswith(("[", "(")):
            return [str(v) for v in ast.literal_eval(value)]
        return [value]
    return [str(v) for v in value]


def bundle_root(argv: Sequence[str] | None = None) -> str:
    """The bundle folder: parent of the `configs/` folder of the first `--config_file` on the command line.

    The configs' default `bundle_root` comes from here so that a bundle runs from any working directory.
    """
    argv = sys.argv if argv is None else argv
    config_file = _argv_value(argv, "config_file")
    if config_file is None:
        return "."
    first = Path(_as_file_list(config_file)[0]).resolve()
    return str(first.parent.parent if first.parent.name == "configs" else first.parent)


def check_override_keys(config_files: Sequence[str], keys: Sequence[str]) -> None:
    """Refuse override ids that no config defines: a typo must not silently become a new, unused setting."""
    from monai.bundle import ConfigParser

    config = ConfigParser.load_config_files(list(config_files))
    for key in keys:
        root = key.split("#", 1)[0]
        if key not in RUN_ARGS and root not in config:
            known = ", ".join(sorted(k for k in config if not k.startswith("_") and k != "imports"))
            raise MedpipeError(f"unknown override '--{key}' for {', '.join(config_files)}; known keys: {known}")


def check_overrides(argv: Sequence[str] | None = None) -> None:
    """The configs' first `initialize` step: one-line errors, known override keys, typed parameter values.

    Installs the one-line error hook; refuses `python -m monai.bundle run …` override keys that no config defines; then
    coerces the declared parameters of the running config (`'false'` → False, `'3'` → 3) or refuses them in one line;
    last, refuses an output folder the job cannot write (read-only, a file in the way) before any data is read.
    """
    install_excepthook()
    argv = sys.argv if argv is None else argv
    if argv and str(argv[0]).replace("\\", "/").endswith("monai/bundle/__main__.py"):
        config_file = _argv_value(argv, "config_file")
        if config_file is not None:
            keys = [t[2:].split("=", 1)[0] for t in argv[1:] if t.startswith("--")]
            check_override_keys(_as_file_list(config_file), keys)
    apply_to_running_config()
    check_output_folder()


def check_output_folder() -> str | None:
    """The running job's output folder (training: ckpt_dir; evaluate, inference: output_dir) takes files, or one
    line (medpipe.files.check_writable_dir: nothing is created); returns the folder checked. Outside a running
    workflow, or for a run id that is none of the jobs, this does nothing."""
    from medpipe.files import check_writable_dir

    workflow, parser, resolver = _running_config()
    if workflow is None or parser is None or resolver is None:
        return None
    job = getattr(workflow, "run_id", None)
    if job not in JOB_OUTPUTS:  # `run`: the job whose steps it holds ("%inferring", or their resolved copy)
        target = parser.config.get(job)
        job = next((j for j in JOB_OUTPUTS if j in parser.config and target in (f"%{j}", parser.config[j])), None)
    key = JOB_OUTPUTS.get(job or "")
    if key is None or key not in parser.config:
        return None
    folder = str(resolver.get_resolved_content(key))
    check_writable_dir(folder, f"--{key}")
    return folder


def require_file(path: str, what: str, hint: str = "") -> str:
    """Fail early, in one line, when an input file such as the checkpoint is missing."""
    if not Path(path).is_file():
        raise MedpipeError(f"{what} '{path}' not found{'; ' + hint if hint else ''}")
    return path


def config_files(bundle_dir: str | Path, config: str = "train", network: str | None = None) -> list[str]:
    """The config files for a bundle job: train.json, the network overlay, then the job's own overlay."""
    bundle_dir = Path(bundle_dir)
    if not (bundle_dir / "configs" / "train.json").is_file():
        raise MedpipeError(f"'{bundle_dir}' is not a medpipe bundle (no configs/train.json)")
    if config not in CONFIGS:
        raise MedpipeError(f"config must be one of {sorted(CONFIGS)}, got '{config}'")
    names = CONFIGS[config][:1] + ([f"net_{network}"] if network else []) + CONFIGS[config][1:]
    files = [bundle_dir / "configs" / f"{name}.json" for name in names]
    for f in files:
        if not f.is_file():
            nets = sorted(p.stem[4:] for p in (bundle_dir / "configs").glob("net_*.json"))
            raise MedpipeError(f"no config '{f}'" + (f"; networks available: {nets}" if network else ""))
    return [str(f) for f in files]


def run_bundle(
    bundle_dir: str | Path, config: str = "train", network: str | None = None, **overrides: Any
) -> list[Any]:
    """Run one bundle job in this process, with the same checks as the command line."""
    return run_config_files(config_files(bundle_dir, config, network), **overrides)


def run_config_files(files: Sequence[str | Path], **overrides: Any) -> list[Any]:
    """Run the workflow that `files` (train.json first, then overlays such as pretrain_4class.json) define, in this
    process: override keys are checked as on the command line; `bundle_root` defaults to the first file's bundle."""
    workflow = initialized_workflow(files, **overrides)
    result = workflow.run()
    workflow.finalize()
    return result


def initialized_workflow(files: Sequence[str | Path], **overrides: Any) -> Any:
    """The ConfigWorkflow `run_config_files` runs, initialized and not yet run: for a caller that keeps some of its
    objects for later jobs (medpipe.bundle.archive keeps the built network)."""
    from monai.bundle import ConfigWorkflow

    files = [str(f) for f in files]
    check_override_keys(files, list(overrides))
    overrides.update(coerce_values(declared_parameters(Path(files[0]).resolve().parent.parent), overrides))
    overrides.setdefault("bundle_root", str(Path(files[0]).resolve().parent.parent))
    workflow = ConfigWorkflow(config_file=files, workflow_type=None, **overrides)
    workflow.initialize()
    return workflow


def find_bundle(bundle: str | Path) -> Path:
    """A bundle folder given as a path, or by name under ./bundles or this checkout's bundles/."""
    candidates = [Path(bundle), Path("bundles") / bundle, Path(__file__).resolve().parents[2] / "bundles" / bundle]
    for candidate in candidates:
        if (candidate / "configs" / "train.json").is_file():
            return candidate
    raise MedpipeError(f"no bundle '{bundle}': give a bundle folder or one of the names under bundles/")
