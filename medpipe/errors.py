"""One error type for bad input, reported as one line instead of a stack trace."""

from __future__ import annotations

import os
import sys
from types import TracebackType


class MedpipeError(Exception):
    """Bad input or configuration that the user can fix; the message says what and how."""


def first_line(exc: BaseException) -> str:
    """An exception's first message line for a one-line error, or its type when it has none (EOFError)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def find_medpipe_error(exc: BaseException | None) -> MedpipeError | None:
    """Walk the cause/context chain: MONAI and ignite wrap errors raised inside transforms and handlers."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, MedpipeError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _one_line_hook(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None, _default=sys.excepthook
) -> None:
    err = find_medpipe_error(exc)
    if err is None:
        _default(exc_type, exc, tb)
        return
    print(f"medpipe error: {err}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    # exit now: worker threads torn down during a normal shutdown can abort with a second, misleading message
    # ("terminate called without an active exception"); every output is written atomically, so nothing is lost
    os._exit(1)


def install_excepthook() -> None:
    """Print MedpipeErrors (even wrapped ones) as one line; leave every other error's traceback alone."""
    sys.excepthook = _one_line_hook
