"""`medpipe <verb> …`: one fire entry point; each verb lives in the module that owns its concern.

Verbs are imported lazily so that `medpipe --help` does not import torch, MONAI or MLflow."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from medpipe.errors import find_medpipe_error

# verb -> "module:function"; add a line here to add a verb.
VERBS: dict[str, str] = {
    "run": "medpipe.cli.commands:run_command",
    "run_help": "medpipe.cli.commands:run_help_command",
    "cv": "medpipe.cli.commands:cv_command",
    "cv_report": "medpipe.cli.commands:cv_report_command",
    "cv_rescore": "medpipe.cli.commands:cv_rescore_command",
    "cv_ensemble": "medpipe.cli.commands:cv_ensemble_command",
    "cv_postprocessing": "medpipe.cli.commands:cv_postprocessing_command",
    "demo": "medpipe.cli.commands:demo_command",
    "verify": "medpipe.cli.commands:verify_command",
    "ingest": "medpipe.cli.commands:ingest_command",
    "compare": "medpipe.cli.commands:compare_command",
    "zoo": "medpipe.cli.commands:zoo_command",
    "export": "medpipe.cli.commands:export_command",
    "serve": "medpipe.cli.commands:serve_command",
    "pull": "medpipe.cli.commands:pull_command",
    "viewer": "medpipe.cli.commands:viewer_command",
    "cards": "medpipe.cli.commands:cards_command",
    "calibrate": "medpipe.cli.commands:calibrate_command",
    "guard": "medpipe.cli.commands:guard_command",
    "dataset": "medpipe.cli.commands:dataset_command",
}


def _lazy(target: str) -> Callable[..., Any]:
    module_name, func_name = target.split(":")

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module_name), func_name)(*args, **kwargs)

    call.__name__ = func_name
    call.__doc__ = f"see {module_name}.{func_name}"
    return call


def main(argv: list[str] | None = None) -> int:
    import fire

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 1 and argv[0] == "run" and not argv[1].startswith("-") and {"--help", "-h"} & set(argv):
        argv = [a for a in argv if a not in ("--help", "-h")]  # the bundle's declared parameters, not fire's help
        return main(["run_help", *argv[1:]])
    if argv and argv[0] in VERBS:
        # show the real function's signature and docstring for `medpipe VERB --help`
        module_name, func_name = VERBS[argv[0]].split(":")
        component: Any = getattr(importlib.import_module(module_name), func_name)
        argv = argv[1:]
        name = f"medpipe {sys.argv[1] if len(sys.argv) > 1 else ''}".strip()
    else:
        component = {verb: _lazy(target) for verb, target in VERBS.items()}
        name = "medpipe"
    try:
        fire.Fire(component, command=argv, name=name)
    except Exception as exc:  # one line for errors the user can fix, full traceback otherwise
        err = find_medpipe_error(exc)
        if err is None:
            raise
        print(f"medpipe error: {err}", file=sys.stderr)
        return 2
    return 0


def entry() -> None:
    code = main()
    if code:
        # leave now, as the bundles' one-line error hook does: worker threads torn down by a normal shutdown after a
        # failed job can abort the process ("terminate called without an active exception", exit 134)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
