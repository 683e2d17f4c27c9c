"""The DICOM node's durable state: received instances and jobs in one SQLite file (WAL), shared by the SCP threads,
the worker and `medpipe serve status` (another process).

A job is one series: received → running → send_pending → done, or failed (with the reason), or skipped (no route).
Its key is the SeriesInstanceUID plus a hash of its SOP instance UIDs, so the same series pushed twice is processed
once. Every change commits before anything depends on it (synchronous=FULL), so a SIGKILL at any point leaves a
state the next start resumes from (`recover`)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATES = ("received", "running", "send_pending", "done", "failed", "skipped")

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sop_instance_uid TEXT NOT NULL, series_instance_uid TEXT NOT NULL, study_instance_uid TEXT,
    sop_class_uid TEXT, modality TEXT, body_part TEXT, calling_ae TEXT,
    path TEXT NOT NULL, received_at REAL NOT NULL, job_id INTEGER
);
CREATE INDEX IF NOT EXISTS instances_pending ON instances (series_instance_uid, job_id);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT UNIQUE NOT NULL, series_instance_uid TEXT NOT NULL, study_instance_uid TEXT,
    modality TEXT, body_part TEXT, sop_class_uid TEXT, n_instances INTEGER NOT NULL,
    state TEXT NOT NULL, route TEXT, reason TEXT,
    attempts INTEGER NOT NULL DEFAULT 0, send_attempts INTEGER NOT NULL DEFAULT 0, next_try_at REAL NOT NULL DEFAULT 0,
    first_received_at REAL, last_received_at REAL, created_at REAL NOT NULL, updated_at REAL NOT NULL,
    results TEXT NOT NULL DEFAULT '[]', timings TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, job_id INTEGER, level TEXT NOT NULL, message TEXT NOT NULL
);
"""


@dataclass
class Job:
    """One row of the jobs table."""

    id: int
    key: str
    series_instance_uid: str
    study_instance_uid: str | None
    modality: str | None
    body_part: str | None
    sop_class_uid: str | None
    n_instances: int
    state: str
    route: str | None
    reason: str | None
    attempts: int
    send_attempts: int
    next_try_at: float
    first_received_at: float | None
    last_received_at: float | None
    created_at: float
    updated_at: float
    results: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        values = dict(row)
        values["results"], values["timings"] = json.loads(values["results"]), json.loads(values["timings"])
        return cls(**values)


def series_key(series_instance_uid: str, sop_instance_uids: Sequence[str]) -> str:
    """Job identity: the series plus a hash of exactly which instances it holds."""
    digest = hashlib.sha256("\n".join(sorted(set(sop_instance_uids))).encode()).hexdigest()[:16]
    return f"{series_instance_uid}:{digest}"


class JobQueue:
    """Thread-safe access to the node's SQLite state file (one connection, one lock; WAL lets other processes read)."""

    def __init__(self, db_path: str | Path) -> None:
        self.path = Path(db_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before the C-STORE is acknowledged
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # ------------------------------------------------------------------------------------------------ instances
    def add_instance(self, meta: dict[str, Any], path: str | Path) -> None:
        """Record a stored instance; a resend of an instance not yet in a job replaces nothing (same file)."""
        with self._tx() as db:
            known = db.execute(
                "SELECT 1 FROM instances WHERE sop_instance_uid = ? AND job_id IS NULL", (meta["sop_instance_uid"],)
            ).fetchone()
            if known:
                db.execute(
                    "UPDATE instances SET received_at = ? WHERE sop_instance_uid = ? AND job_id IS NULL",
                    (time.time(), meta["sop_instance_uid"]),
                )
                return
            db.execute(
                "INSERT INTO instances (sop_instance_uid, series_instance_uid, study_instance_uid, sop_class_uid,"
                " modality, body_part, calling_ae, path, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (meta["sop_instance_uid"], meta["series_instance_uid"], meta.get("study_instance_uid"),
                 meta.get("sop_class_uid"), meta.get("modality"), meta.get("body_part"), meta.get("calling_ae"),
                 str(path), time.time()),
            )  # fmt: skip

    def collect_quiet_series(self, quiet_s: float) -> list[tuple[int | None, list[str]]]:
        """Turn every series whose last instance arrived more than `quiet_s` ago into a job.

        Returns (job id, instance paths) per series; the id is None when the same series (same instances) already
        has a job, in which case the paths are duplicates the caller may delete.
        """
        made = []
        with self._tx() as db:
            now = time.time()
            series = db.execute(
                "SELECT series_instance_uid, MAX(received_at) AS last, MIN(received_at) AS first FROM instances"
                " WHERE job_id IS NULL GROUP BY series_instance_uid HAVING MAX(received_at) < ?",
                (now - quiet_s,),
            ).fetchall()
            for s in series:
                rows = db.execute(
                    "SELECT * FROM instances WHERE series_instance_uid = ? AND job_id IS NULL",
                    (s["series_instance_uid"],),
                ).fetchall()
                key = series_key(s["series_instance_uid"], [r["sop_instance_uid"] for r in rows])
                # a resend of (part of) a series already in a job adds nothing: not processed again
                seen = {
                    r["sop_instance_uid"]
                    for r in db.execute(
                        "SELECT sop_instance_uid FROM instances WHERE series_instance_uid = ? AND job_id IS NOT NULL",
                        (s["series_instance_uid"],),
                    )
                }
                existing = db.execute("SELECT id FROM jobs WHERE key = ?", (key,)).fetchone()
                if existing is None and seen and {r["sop_instance_uid"] for r in rows} <= seen:
                    existing = db.execute(
                        "SELECT id FROM jobs WHERE series_instance_uid = ? ORDER BY id DESC LIMIT 1",
                        (s["series_instance_uid"],),
                    ).fetchone()
                if existing:
                    job_id = int(existing["id"])
                    self._event(db, job_id, "info", f"series received again ({len(rows)} instances): not reprocessed")
                    made.append((None, [r["path"] for r in rows]))
                else:
                    first = rows[0]
                    cursor = db.execute(
                        "INSERT INTO jobs (key, series_instance_uid, study_instance_uid, modality, body_part,"
                        " sop_class_uid, n_instances, state, first_received_at, last_received_at, created_at,"
                        " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, 'received', ?, ?, ?, ?)",
                        (key, s["series_instance_uid"], first["study_instance_uid"], first["modality"],
                         first["body_part"], first["sop_class_uid"], len(rows), s["first"], s["last"], now, now),
                    )  # fmt: skip
                    job_id = int(cursor.lastrowid)
                    made.append((job_id, [r["path"] for r in rows]))
                db.execute(
                    f"UPDATE instances SET job_id = ? WHERE id IN ({','.join('?' * len(rows))})",
                    (job_id, *[r["id"] for r in rows]),
                )
        return made

    def job_instances(self, job_id: int) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM instances WHERE job_id = ? ORDER BY id", (job_id,)).fetchall()
        return [dict(r) for r in rows]

    # ----------------------------------------------------------------------------------------------------- jobs
    def recover(self, max_attempts: int) -> int:
        """After a crash: jobs left `running` go back to `received`, or fail once they used up their attempts."""
        with self._tx() as db:
            rows = db.execute("SELECT id, attempts FROM jobs WHERE state = 'running'").fetchall()
            for row in rows:
                if row["attempts"] >= max_attempts:
                    self._set(db, row["id"], "failed", reason=f"interrupted {row['attempts']} times (crash?)")
                else:
                    self._set(db, row["id"], "received")
                    self._event(db, row["id"], "warning", "was running when the node stopped: resumed")
        return len(rows)

    def claim_next(self) -> Job | None:
        """The oldest `received` job, now `running` with one more attempt; None when there is none."""
        with self._tx() as db:
            row = db.execute("SELECT id FROM jobs WHERE state = 'received' ORDER BY id LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET attempts = attempts + 1 WHERE id = ?", (row["id"],))
            self._set(db, row["id"], "running")
        return self.get(int(row["id"]))

    def next_to_send(self) -> Job | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id FROM jobs WHERE state = 'send_pending' AND next_try_at <= ? ORDER BY next_try_at, id"
                " LIMIT 1",
                (time.time(),),
            ).fetchone()
        return None if row is None else self.get(int(row["id"]))

    def get(self, job_id: int) -> Job:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(job_id)
        return Job.from_row(row)

    def jobs(self, state: str | None = None) -> list[Job]:
        with self._lock:
            query, args = (
                ("SELECT * FROM jobs WHERE state = ? ORDER BY id", (state,))
                if state
                else ("SELECT * FROM jobs ORDER BY id", ())
            )
            return [Job.from_row(r) for r in self._db.execute(query, args).fetchall()]

    def set_state(self, job_id: int, state: str, reason: str | None = None, **columns: Any) -> None:
        with self._tx() as db:
            self._set(db, job_id, state, reason, **columns)
            if state in ("failed", "skipped") and reason:
                self._event(db, job_id, "error" if state == "failed" else "info", reason)

    def send_failed(self, job_id: int, reason: str, delay_s: float) -> None:
        """Keep the job waiting to send; try again after `delay_s`."""
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET send_attempts = send_attempts + 1, next_try_at = ?, reason = ?, updated_at = ?"
                " WHERE id = ?",
                (time.time() + delay_s, reason, time.time(), job_id),
            )
            self._event(db, job_id, "warning", f"send failed, retry in {delay_s:.0f}s: {reason}")

    def add_timings(self, job_id: int, **seconds: float) -> None:
        with self._tx() as db:
            row = db.execute("SELECT timings FROM jobs WHERE id = ?", (job_id,)).fetchone()
            timings = {**json.loads(row["timings"]), **{k: round(v, 3) for k, v in seconds.items()}}
            db.execute("UPDATE jobs SET timings = ? WHERE id = ?", (json.dumps(timings), job_id))

    def log(self, job_id: int | None, level: str, message: str) -> None:
        with self._tx() as db:
            self._event(db, job_id, level, message)

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
        return {state: 0 for state in STATES} | {r["state"]: int(r["n"]) for r in rows}

    def events(self, levels: Sequence[str] = ("error", "warning"), limit: int = 10) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM events WHERE level IN ({','.join('?' * len(levels))}) ORDER BY id DESC LIMIT ?",
                (*levels, limit),
            ).fetchall()
        return [dict(r) for r in rows]

    def pending_instances(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM instances WHERE job_id IS NULL").fetchone()[0])

    @staticmethod
    def _set(db: sqlite3.Connection, job_id: int, state: str, reason: str | None = None, **columns: Any) -> None:
        assert state in STATES, state
        values = {"state": state, "updated_at": time.time(), **columns}
        if reason is not None or state in ("received", "running", "done"):
            values["reason"] = reason
        for key in ("results", "timings"):
            if key in values and not isinstance(values[key], str):
                values[key] = json.dumps(values[key])
        db.execute(f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in values)} WHERE id = ?", (*values.values(), job_id))

    @staticmethod
    def _event(db: sqlite3.Connection, job_id: int | None, level: str, message: str) -> None:
        db.execute(
            "INSERT INTO events (at, job_id, level, message) VALUES (?, ?, ?, ?)", (time.time(), job_id, level, message)
        )
