"""`medpipe serve status`: queue counts, jobs waiting to send, failures and the last warnings, read from the node's
state file (safe while the node runs: SQLite WAL lets a second process read). It opens the file read-only and
refuses one that is not a medpipe queue: looking never changes the node's state."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from medpipe.errors import MedpipeError, first_line
from medpipe.serve.queue import JobQueue


def node_status(work_dir: str | Path, last: int = 10, timeout_s: float = 5.0) -> dict[str, Any]:
    """Counts per state, instances not yet in a job, series held, jobs waiting to send, failed and superseded jobs
    and the last problems."""
    db_path = Path(work_dir) / "queue.sqlite"
    if not db_path.is_file():
        raise MedpipeError(f"no DICOM node state in '{work_dir}' (no queue.sqlite): is this the node's work_dir?")
    queue = JobQueue(db_path, read_only=True, timeout_s=timeout_s)
    try:
        now = time.time()
        waiting = [
            {"job": j.id, "series": j.series_instance_uid, "send_attempts": j.send_attempts,
             "next_try_in_s": round(max(0.0, j.next_try_at - now), 1), "last_error": j.reason}
            for j in queue.jobs("send_pending")
        ]  # fmt: skip
        failed = [
            {"job": j.id, "series": j.series_instance_uid, "route": j.route, "reason": j.reason}
            for j in queue.jobs("failed")
        ][-last:]
        superseded = [
            {"job": j.id, "series": j.series_instance_uid, "reason": j.reason} for j in queue.jobs("superseded")
        ][-last:]
        return {
            "counts": queue.counts(),
            "instances_not_in_a_job": queue.pending_instances(),
            "held": queue.held_series(),
            "superseded": superseded,
            "waiting_to_send": waiting,
            "failed": failed,
            "last_problems": queue.events(limit=last),
        }
    except sqlite3.Error as exc:  # locked past the timeout, or damaged beyond its header
        raise MedpipeError(f"cannot read the node's queue '{db_path}': {first_line(exc)}") from exc
    finally:
        queue.close()


def format_status(status: dict[str, Any]) -> str:
    """The status as a few plain lines for an operator."""
    counts = status["counts"]
    lines = ["jobs: " + ", ".join(f"{state} {n}" for state, n in counts.items())]
    lines.append(f"instances received, series still open: {status['instances_not_in_a_job']}")
    for h in status.get("held", []):
        lines.append(
            f"held: series {h['series']}: {h['instances']} instance(s) could not be stored ({h['reason']}); "
            "not processed until the sender sends them again"
        )
    for w in status["waiting_to_send"]:
        lines.append(
            f"waiting to send: job {w['job']} ({w['send_attempts']} tries, next in {w['next_try_in_s']}s): "
            f"{w['last_error']}"
        )
    for f in status["failed"]:
        lines.append(f"failed: job {f['job']} series {f['series']} ({f['route']}): {f['reason']}")
    for r in status.get("superseded", []):
        lines.append(f"superseded: job {r['job']} series {r['series']}: {r['reason']}")
    for e in status["last_problems"]:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["at"]))
        lines.append(f"{stamp} {e['level']} job {e['job_id']}: {e['message']}")
    return "\n".join(lines)
