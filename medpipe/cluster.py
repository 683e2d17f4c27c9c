"""Running medpipe's jobs as tasks on a Ray cluster (`--cluster`): connect, submit each job with its declared CPUs and
GPUs, wait so that Ctrl-C cancels every task, and turn a failed task into one line that names it.

Ray owns the scheduling and the retries (a task lost with its worker or node is run again, up to `max_retries`
times); a job stays a plain function of its arguments that writes its files atomically, so it can be re-run. Every
node needs medpipe installed and the same paths (data, bundles, output) on shared storage: docs/scale.md."""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from medpipe.errors import MedpipeError, find_medpipe_error, first_line

CLUSTER_FORMS = ("ray (the cluster RAY_ADDRESS names or `ray start` made on this machine, else a new local one), auto "
                 "(an existing cluster only), ray://HOST:PORT (Ray Client, from outside the cluster) or HOST:PORT "
                 "(the head's address, from a cluster node)")  # fmt: skip
_HOST_PORT = re.compile(r"^(ray://)?[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")
ENV_PREFIX = "MEDPIPE_"  # the driver's MEDPIPE_* variables (data root, caches) hold on every node too
WAIT_S = 0.5  # how often the driver wakes while tasks run: Ctrl-C and SIGTERM get in within this


@dataclass
class Task:
    """One call of the job function: `name` is how a failure is reported ("fold 2")."""

    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


def ray_address(cluster: str) -> str | None:
    """`--cluster` → the address for `ray.init`; MedpipeError for anything else."""
    cluster = str(cluster).strip()
    if cluster == "ray":
        return None
    if cluster == "auto" or _HOST_PORT.match(cluster):
        return cluster
    raise MedpipeError(f"--cluster '{cluster}' is not a cluster address: give {CLUSTER_FORMS}")


def _check_answers(cluster: str, address: str, timeout_s: float = 10.0) -> None:
    """Ray retries an address that does not answer for minutes, in log lines; a plain connection says it at once."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        reason = exc.strerror or exc
        raise MedpipeError(f"--cluster {cluster}: nothing answers at {host}:{port} ({reason}); start the head with "
                           "`ray start --head` (docs/scale.md) or give its address") from None  # fmt: skip


def connect(cluster: str) -> None:
    """Join (or start) the Ray cluster `--cluster` names; one line when Ray is missing or nothing answers there."""
    address = ray_address(cluster)
    try:
        import ray
    except ImportError:
        raise MedpipeError(f"--cluster {cluster} needs Ray: pip install 'medpipe[ray]' (on every node)") from None
    if ray.is_initialized():
        return
    if address not in (None, "auto"):
        _check_answers(cluster, address)
    try:
        ray.init(address=address, log_to_driver=True)
    except (ConnectionError, TimeoutError, ValueError) as exc:
        raise MedpipeError(f"--cluster {cluster}: no Ray cluster answers ({first_line(exc)}); start one with "
                           "`ray start --head` (docs/scale.md) or give its address") from None  # fmt: skip


def _in_driver_context(cwd: str, env: dict[str, str], job: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run `job` on a worker in the driver's working folder and MEDPIPE_* environment, so relative paths and
    `$MEDPIPE_DATA` mean on every node what they meant where the command was typed."""
    if not os.path.isdir(cwd):
        raise MedpipeError(f"node {socket.gethostname()} cannot see the working folder '{cwd}': every node needs "
                           "the same paths (shared storage, docs/scale.md)")  # fmt: skip
    os.chdir(cwd)
    os.environ.update(env)
    return job(*args, **kwargs)


def _result(ray: Any, ref: Any, task: Task, attempts: int) -> Any:
    """A finished task's value; its MedpipeError, or the loss of its worker after every retry, as one line."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:  # the job itself raised: Ray does not retry that
        found = find_medpipe_error(getattr(exc, "cause", None))
        if found is None:
            raise
        raise MedpipeError(f"{task.name}: {found}") from None
    except ray.exceptions.RayError as exc:  # worker crashed, node died, out of memory: Ray gave up retrying
        raise MedpipeError(f"{task.name} was lost with its worker or node in each of {attempts} attempts "
                           f"({type(exc).__name__}: {first_line(exc)})") from None  # fmt: skip


def cancel(ray: Any, refs: Sequence[Any], settle_s: float = 30.0) -> None:
    """Cancel tasks (queued ones never start, running ones are killed) and wait until they have ended, so that the
    caller may tidy their files."""
    for ref in refs:
        ray.cancel(ref, force=True)
    if refs:
        ray.wait(list(refs), num_returns=len(refs), timeout=settle_s)


def run_tasks(
    job: Callable[..., Any], tasks: Sequence[Task], *, num_cpus: float = 1, num_gpus: float = 0,
    max_retries: int = 2, on_done: Callable[[Task, Any], None] | None = None,
) -> list[Any]:
    """Run `job(*task.args, **task.kwargs)` for every task on the connected cluster; values in task order.

    All tasks are submitted at once and Ray starts each when a node has its CPUs/GPUs free. The first failure, or
    Ctrl-C (KeyboardInterrupt, as the caller maps SIGTERM to), cancels the rest and re-raises."""
    import ray

    remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries, retry_exceptions=False)
    submit = remote(_in_driver_context)
    cwd, env = os.getcwd(), {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)}
    refs = [submit.remote(cwd, env, job, *t.args, **t.kwargs) for t in tasks]
    task_of = dict(zip(refs, tasks, strict=True))
    values: dict[Any, Any] = {}
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=WAIT_S)
            for ref in done:
                values[ref] = _result(ray, ref, task_of[ref], 1 + max_retries)
                if on_done is not None:
                    on_done(task_of[ref], values[ref])
    except BaseException:
        cancel(ray, pending)
        raise
    return [values[ref] for ref in refs]


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """`kill PID` of the driver stops its tasks as Ctrl-C does (run_tasks cancels them on KeyboardInterrupt), rather
    than leaving them running without it. Signal handlers can be set only in the main thread: elsewhere, nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
