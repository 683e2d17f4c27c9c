"""The DICOM node's durable state: received instances and jobs in one SQLite file (WAL), shared by the SCP threads,
the worker and `medpipe serve status` (another process).

A job is one series: received → running → send_pending → done, or failed (with the reason), or skipped (no route),
or superseded (the series came again with new or changed instances: a newer job processes it whole). An instance is
known by its series, its SOPInstanceUID and a hash of its content, so the same series pushed twice is processed once,
while a series that grows, or is re-sent corrected, is processed again whole, never in parts. A series with an
instance the node could not store (disk full) is held until the sender sends that instance again. Every change
commits before anything depends on it (synchronous=FULL), so a SIGKILL at any point leaves a state the next start
resumes from (`recover`)."""

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

from medpipe.errors import MedpipeError, first_line

STATES = ("received", "running", "send_pending", "done", "failed", "skipped", "superseded")
TABLES = {"instances", "jobs", "events"}

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sop_instance_uid TEXT NOT NULL, series_instance_uid TEXT NOT NULL, study_instance_uid TEXT,
    sop_class_uid TEXT, modality TEXT, body_part TEXT, calling_ae TEXT,
    path TEXT NOT NULL, received_at REAL NOT NULL, job_id INTEGER, digest TEXT
);
CREATE INDEX IF NOT EXISTS instances_pending ON instances (series_instance_uid, job_id);
CREATE INDEX IF NOT EXISTS instances_path ON instances (path);
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
CREATE TABLE IF NOT EXISTS unstored (
    series_instance_uid TEXT NOT NULL, sop_instance_uid TEXT NOT NULL, at REAL NOT NULL, reason TEXT,
    PRIMARY KEY (series_instance_uid, sop_instance_uid)
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


def series_key(series_instance_uid: str, sop_instance_uids: Sequence[str], digests: Sequence[str | None] = ()) -> str:
    """Job identity: the series plus a hash of exactly which instances (and, when known, which contents) it holds."""
    contents = list(digests) or [None] * len(sop_instance_uids)
    items = sorted({f"{uid}:{digest or ''}" for uid, digest in zip(sop_instance_uids, contents, strict=True)})
    digest = hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]
    return f"{series_instance_uid}:{digest}"


def _describe(added: int, changed: int) -> str:
    parts = [f"{added} new instance(s)" if added else "", f"{changed} changed instance(s)" if changed else ""]
    return " and ".join(p for p in parts if p)


class JobQueue:
    """Thread-safe access to the node's SQLite state file (one connection, one lock; WAL lets other processes read).

    `read_only` (for `medpipe serve status`) opens the file with SQLite's `mode=ro`: it never creates, migrates or
    writes it, and refuses a file that is not a medpipe queue. A damaged, foreign or locked file is one MedpipeError.
    """

    def __init__(self, db_path: str | Path, read_only: bool = False, timeout_s: float = 30.0) -> None:
        self.path = Path(db_path)
        self._lock = threading.RLock()
        # instances not stored when even the state file could not take a note of it (disk full): kept here
        self._unstored_mem: set[tuple[str, str]] = set()
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        target, uri = (f"{self.path.resolve().as_uri()}?mode=ro", True) if read_only else (str(self.path), False)
        try:
            self._db = sqlite3.connect(
                target, uri=uri, check_same_thread=False, isolation_level=None, timeout=timeout_s
            )
        except sqlite3.Error as exc:
            raise MedpipeError(f"cannot open the node's queue '{self.path}': {first_line(exc)}") from exc
        self._db.row_factory = sqlite3.Row
        try:
            tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if (read_only and not TABLES <= tables) or (tables - {"sqlite_sequence"} and "jobs" not in tables):
                raise MedpipeError(
                    f"'{self.path}' is not a medpipe node queue ("
                    + ("an empty file" if not tables else f"tables: {', '.join(sorted(tables))}")
                    + "): is this the node's work_dir?"
                )
            if not read_only:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before the C-STORE is acknowledged
                self._db.executescript(SCHEMA)
                columns = {r["name"] for r in self._db.execute("PRAGMA table_info(instances)")}
                if "digest" not in columns:  # a queue written by an older medpipe
                    self._db.execute("ALTER TABLE instances ADD COLUMN digest TEXT")
        except sqlite3.Error as exc:
            self._db.close()
            why = first_line(exc)
            if "locked" in why or "busy" in why:
                hint = "another process holds it (a second node on this work_dir, an open sqlite3 shell?)"
            else:
                hint = "the file is damaged or not SQLite: move it aside (a new node starts an empty queue)"
            raise MedpipeError(f"cannot use the node's queue '{self.path}': {why}; {hint}") from exc
        except MedpipeError:
            self._db.close()
            raise

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
    def add_instance(self, meta: dict[str, Any], path: str | Path) -> str | None:
        """Record a stored instance (`meta["digest"]`: a hash of its content, when known).

        An instance is one (series, SOPInstanceUID): the same one sent again while its series is still open replaces
        the earlier copy (the later one counts). Returns the earlier copy's file when it is no longer needed, for
        the caller to delete; None otherwise."""
        series, sop = meta["series_instance_uid"], meta["sop_instance_uid"]
        columns = ("study_instance_uid", "sop_class_uid", "modality", "body_part", "calling_ae")
        values = (*[meta.get(c) for c in columns], str(path), time.time(), meta.get("digest"))
        with self._tx() as db:
            db.execute("DELETE FROM unstored WHERE series_instance_uid = ? AND sop_instance_uid = ?", (series, sop))
            self._unstored_mem.discard((series, sop))
            known = db.execute(
                "SELECT id, path, digest FROM instances WHERE series_instance_uid = ? AND sop_instance_uid = ?"
                " AND job_id IS NULL",
                (series, sop),
            ).fetchone()
            if known is None:
                db.execute(
                    "INSERT INTO instances (study_instance_uid, sop_class_uid, modality, body_part, calling_ae,"
                    " path, received_at, digest, sop_instance_uid, series_instance_uid)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (*values, sop, series),
                )
                return None
            db.execute(
                "UPDATE instances SET study_instance_uid = ?, sop_class_uid = ?, modality = ?, body_part = ?,"
                " calling_ae = ?, path = ?, received_at = ?, digest = ? WHERE id = ?",
                (*values, known["id"]),
            )
            if known["digest"] != meta.get("digest"):
                self._event(db, None, "warning", f"instance {sop} of series {series} came again with other content"
                            " before the series closed: the later copy is used")  # fmt: skip
            if known["path"] != str(path) and not self._referenced(db, known["path"]):
                return str(known["path"])
        return None

    def record_unstored(self, series_instance_uid: str, sop_instance_uid: str, reason: str) -> None:
        """An instance of this series reached the node but could not be stored (the sender was told to retry): the
        series is held, never processed without it, until the sender sends it again."""
        key = (series_instance_uid, sop_instance_uid)
        try:
            with self._tx() as db:
                first = db.execute(
                    "SELECT 1 FROM unstored WHERE series_instance_uid = ? LIMIT 1", (series_instance_uid,)
                ).fetchone()
                db.execute("INSERT OR REPLACE INTO unstored VALUES (?, ?, ?, ?)", (*key, time.time(), reason))
                if first is None:
                    self._event(db, None, "warning", f"series {series_instance_uid}: an instance could not be stored"
                                f" ({reason}); the series is held until the sender sends it again")  # fmt: skip
        except sqlite3.Error:  # the state file cannot take it either (same full disk): remember it while running
            with self._lock:
                self._unstored_mem.add(key)

    def held_series(self) -> list[dict[str, Any]]:
        """Series held because some of their instances could not be stored: series, count, last reason."""
        with self._lock:
            rows = self._db.execute(
                "SELECT series_instance_uid AS series, COUNT(*) AS instances, MAX(at) AS at, reason FROM unstored"
                " GROUP BY series_instance_uid ORDER BY at"
            ).fetchall() if "unstored" in self._tables() else []  # fmt: skip
            held = [dict(r) for r in rows]
            for series in sorted({s for s, _ in self._unstored_mem} - {h["series"] for h in held}):
                count = sum(1 for s, _ in self._unstored_mem if s == series)
                held.append({"series": series, "instances": count, "at": None, "reason": "could not be stored"})
        return held

    def collect_quiet_series(self, quiet_s: float) -> list[tuple[int | None, list[str]]]:
        """Turn every series whose last instance arrived more than `quiet_s` ago into a job.

        Returns (job id, instance paths) per series; the id is None when the series came again unchanged (same
        instances, same content) after it had a job, in which case the paths are copies the caller may delete.
        A series with new or changed instances after its job becomes a new job for the whole series (the earlier
        job's instances the sender did not send again are carried over) and the earlier job is superseded: never
        a second result for part of a series. A series held for an unstored instance, or whose job is running,
        waits.
        """
        made: list[tuple[int | None, list[str]]] = []
        with self._tx() as db:
            now = time.time()
            held = {r[0] for r in db.execute("SELECT series_instance_uid FROM unstored")}
            held |= {s for s, _ in self._unstored_mem}
            series = db.execute(
                "SELECT series_instance_uid, MAX(received_at) AS last, MIN(received_at) AS first FROM instances"
                " WHERE job_id IS NULL GROUP BY series_instance_uid HAVING MAX(received_at) < ?",
                (now - quiet_s,),
            ).fetchall()
            for s in series:
                uid = s["series_instance_uid"]
                prior = db.execute(
                    "SELECT id, state FROM jobs WHERE series_instance_uid = ? ORDER BY id DESC LIMIT 1", (uid,)
                ).fetchone()
                if uid in held or (prior is not None and prior["state"] == "running"):
                    continue
                rows = db.execute(
                    "SELECT * FROM instances WHERE series_instance_uid = ? AND job_id IS NULL ORDER BY id", (uid,)
                ).fetchall()
                before = {
                    r["sop_instance_uid"]: r
                    for r in (db.execute("SELECT * FROM instances WHERE job_id = ?", (prior["id"],)) if prior else [])
                }
                added = [r for r in rows if r["sop_instance_uid"] not in before]
                changed = [r for r in rows if r["sop_instance_uid"] in before
                           and r["digest"] != before[r["sop_instance_uid"]]["digest"]]  # fmt: skip
                if prior is not None and not added and not changed:
                    self._event(db, prior["id"], "info", f"series received again ({len(rows)} instances, unchanged):"
                                " not processed again")  # fmt: skip
                    made.append((None, self._drop(db, rows)))
                    continue
                sent = {r["sop_instance_uid"] for r in rows}
                carried = [r for sop, r in before.items() if sop not in sent]
                job_id = self._new_job(db, s, rows, carried, now)
                if prior is not None:
                    what = _describe(len(added), len(changed))
                    self._set(db, prior["id"], "superseded", reason=f"replaced by job {job_id}: the series came again"
                              f" with {what}")  # fmt: skip
                    sent_note = "; its results stay in the PACS" if prior["state"] == "done" else ""
                    self._event(db, job_id, "warning", f"series {uid} came again with {what} after job {prior['id']}"
                                f" ({prior['state']}{sent_note}): the whole series ({len(rows) + len(carried)}"
                                f" instances) is processed again as job {job_id}")  # fmt: skip
                made.append((job_id, [r["path"] for r in [*rows, *carried]]))
        return made

    @staticmethod
    def _new_job(
        db: sqlite3.Connection, s: sqlite3.Row, rows: Sequence[sqlite3.Row], carried: Sequence[sqlite3.Row], now: float
    ) -> int:
        everything = [*rows, *carried]
        uid = s["series_instance_uid"]
        key = series_key(uid, [r["sop_instance_uid"] for r in everything], [r["digest"] for r in everything])
        if db.execute("SELECT 1 FROM jobs WHERE key = ?", (key,)).fetchone():  # same content as an earlier job
            key += f"/{db.execute('SELECT COUNT(*) FROM jobs WHERE series_instance_uid = ?', (uid,)).fetchone()[0]}"
        latest = rows[-1]  # the series' attributes as last sent
        cursor = db.execute(
            "INSERT INTO jobs (key, series_instance_uid, study_instance_uid, modality, body_part,"
            " sop_class_uid, n_instances, state, first_received_at, last_received_at, created_at,"
            " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, 'received', ?, ?, ?, ?)",
            (key, uid, latest["study_instance_uid"], latest["modality"], latest["body_part"],
             latest["sop_class_uid"], len(everything), s["first"], s["last"], now, now),
        )  # fmt: skip
        job_id = int(cursor.lastrowid)
        db.execute(
            f"UPDATE instances SET job_id = ? WHERE id IN ({','.join('?' * len(rows))})",
            (job_id, *[r["id"] for r in rows]),
        )
        for r in carried:  # the earlier job's rows stay as they were: its record is not rewritten
            db.execute(
                "INSERT INTO instances (sop_instance_uid, series_instance_uid, study_instance_uid, sop_class_uid,"
                " modality, body_part, calling_ae, path, received_at, job_id, digest)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (r["sop_instance_uid"], r["series_instance_uid"], r["study_instance_uid"], r["sop_class_uid"],
                 r["modality"], r["body_part"], r["calling_ae"], r["path"], r["received_at"], job_id, r["digest"]),
            )  # fmt: skip
        return job_id

    def _drop(self, db: sqlite3.Connection, rows: Sequence[sqlite3.Row]) -> list[str]:
        """Forget duplicate rows; their files, unless another row still needs the same file."""
        db.execute(f"DELETE FROM instances WHERE id IN ({','.join('?' * len(rows))})", [r["id"] for r in rows])
        return [r["path"] for r in rows if not self._referenced(db, r["path"])]

    @staticmethod
    def _referenced(db: sqlite3.Connection, path: str) -> bool:
        return db.execute("SELECT 1 FROM instances WHERE path = ? LIMIT 1", (str(path),)).fetchone() is not None

    def _tables(self) -> set[str]:
        return {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def set_instance_path(self, instance_id: int, path: str | Path) -> None:
        """Where an instance's file is now (moved into its job's folder)."""
        with self._tx() as db:
            db.execute("UPDATE instances SET path = ? WHERE id = ?", (str(path), instance_id))

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
            row = db.execute(
                "SELECT id FROM jobs WHERE state = 'received' AND next_try_at <= ? ORDER BY id LIMIT 1", (time.time(),)
            ).fetchone()
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

    def retry_later(self, job_id: int, reason: str, base_s: float, max_s: float) -> float:
        """A job that could not run for a passing reason (disk full): back to `received`, run again after a pause that
        doubles with each such retry (up to `max_s`); the try does not count as an interruption. Returns the pause."""
        with self._tx() as db:
            tries = db.execute(
                "SELECT COUNT(*) FROM events WHERE job_id = ? AND message LIKE 'could not run,%'", (job_id,)
            ).fetchone()[0]
            delay = float(min(max_s, base_s * 2**tries))
            db.execute("UPDATE jobs SET attempts = MAX(0, attempts - 1) WHERE id = ?", (job_id,))
            retry_at = time.time() + delay
            self._set(db, job_id, "received", reason=f"waiting to run again: {reason}", next_try_at=retry_at)
            self._event(db, job_id, "warning", f"could not run, retry in {delay:.0f}s: {reason}")
        return delay

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
