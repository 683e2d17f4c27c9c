"""The node: the Storage SCP plus one worker loop that turns quiet series into jobs, runs each job's route and sends
the results back.

Work folder layout: `queue.sqlite` (the state), `incoming/<series UID>/<SOP UID>_<digest>.dcm` (received, not
yet in a job; the content digest keeps a corrected re-send apart from the first), `jobs/<id>/input/` (the job's
instances, moved there) and `jobs/<id>/out/` (masks, report.json, SEG, SR).
Jobs run one at a time (a CPU node); series that arrive meanwhile wait in the queue."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from medpipe.errors import MedpipeError, find_medpipe_error, first_line
from medpipe.serve.queue import Job, JobQueue
from medpipe.serve.routing import Route, Settings
from medpipe.serve.scp import StorageSCP

logger = logging.getLogger(__name__)


def _one_line(exc: BaseException) -> str:
    """An error as one line for status: a MedpipeError's message, else the error's type and first line. An error
    re-raised from a DataLoader worker carries the worker's traceback in its message: its last line names the error."""
    err = find_medpipe_error(exc)
    if err is not None:
        return first_line(err)
    text = str(exc)
    if "Traceback (most recent call last)" in text:
        return [line for line in text.splitlines() if line.strip()][-1].strip()
    return f"{type(exc).__name__}: {first_line(exc)}"


def _disk_full(exc: BaseException | None) -> bool:
    """Is a full disk (or quota) behind this error, anywhere in its chain?"""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


class Node:
    """A running DICOM node; `step()` does one unit of work, `serve_forever()` loops until stopped."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.work_dir = settings.work_dir
        self.incoming_dir, self.jobs_dir = self.work_dir / "incoming", self.work_dir / "jobs"
        self.incoming_dir.mkdir(parents=True, exist_ok=True)
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.queue = JobQueue(self.work_dir / "queue.sqlite")
        self.scp = StorageSCP(self.queue, self.incoming_dir, settings.ae_title, settings.allowed_calling_aes)
        self.models: dict[str, Any] = {}
        self.stopping = threading.Event()

    # --------------------------------------------------------------------------------------------------- life
    def start(self) -> None:
        """Load every route's model (a bad checkpoint stops the node here, not at the first study), resume
        interrupted jobs, then listen."""
        for route in self.settings.routes:
            self._model(route)
        resumed = self.queue.recover(self.settings.max_attempts)
        if resumed:
            logger.warning(f"resumed {resumed} job(s) interrupted by the last stop")
        self.scp.start(self.settings.host, self.settings.port)

    def stop(self) -> None:
        self.stopping.set()
        self.scp.stop()
        self.queue.close()

    def serve_forever(self, idle_sleep_s: float = 0.2) -> None:
        try:
            self.start()
            pause = idle_sleep_s
            while not self.stopping.is_set():
                try:
                    busy = self.step()
                    pause = idle_sleep_s
                except Exception as exc:  # e.g. the state file briefly unwritable: keep serving, try again later
                    logger.error(f"worker: {_one_line(exc)}; trying again in {pause:.1f}s", exc_info=True)
                    busy, pause = False, min(30.0, pause * 2)
                if not busy:
                    self.stopping.wait(pause)
        finally:
            self.stop()

    def step(self) -> bool:
        """Collect quiet series, then run one job or make one send attempt; True when something was done."""
        for job_id, paths in self.queue.collect_quiet_series(self.settings.quiet_seconds):
            if job_id is None:  # the same series again, unchanged: its copies are not needed
                for path in paths:
                    Path(path).unlink(missing_ok=True)
                continue
            try:  # into the job's folder now: incoming/ holds only open series, and a re-send never touches a job
                self._gather(self.queue.get(job_id))
            except Exception as exc:
                self._fail(self.queue.get(job_id), exc)
        job = self.queue.claim_next()
        if job is not None:
            self.process(job)
            return True
        job = self.queue.next_to_send()
        if job is not None:
            self.send(job)
            return True
        return False

    # ---------------------------------------------------------------------------------------------------- jobs
    def _gather(self, job: Job) -> tuple[Path, list[Path]]:
        """Put the job's instances in jobs/<id>/input/<SOP UID>.dcm: moved from incoming/, linked from an earlier job
        of the same series (whose folder stays as it was); idempotent, so a resumed job finds them."""
        input_dir = self.jobs_dir / str(job.id) / "input"
        input_dir.mkdir(parents=True, exist_ok=True)
        incoming = self.incoming_dir.resolve()
        files = []
        for row in self.queue.job_instances(job.id):
            src = Path(row["path"])
            dst = input_dir / f"{row['sop_instance_uid']}.dcm"  # UIDs were checked on receipt (scp._safe_uid)
            if src != dst and src.exists():
                if incoming in src.resolve().parents:
                    os.replace(src, dst)
                else:
                    dst.unlink(missing_ok=True)
                    try:
                        os.link(src, dst)
                    except OSError:  # another file system, or links not allowed
                        shutil.copy2(src, dst)
            if not dst.exists():
                raise MedpipeError(f"instance {row['sop_instance_uid']} was received but its file {src} is gone")
            if src != dst:
                self.queue.set_instance_path(row["id"], dst)
            files.append(dst)
        return input_dir, sorted(files)

    def _model(self, route: Route) -> Any:
        from medpipe.serve.models import load_model

        # route names are unique (routing.Settings), and a model remembers its route: no route runs another's model
        model = self.models.get(route.name)
        if model is None or model.route != route:
            model = self.models[route.name] = load_model(route)
        return model

    def process(self, job: Job) -> None:
        """Run one claimed job to send_pending / done, skipped or failed. Whatever goes wrong ends this job only
        (one line in status): a bad study never stops the node."""
        started = time.time()
        route: Route | None = None
        try:
            route, why = self.settings.route_for(job.modality, job.body_part, job.sop_class_uid)
            transfer = (job.last_received_at or started) - (job.first_received_at or started)
            self.queue.add_timings(job.id, transfer_s=transfer, queue_s=started - (job.last_received_at or started))
            if route is None:
                logger.info(f"job {job.id} ({job.modality}, {job.body_part}) skipped: {why}")
                self._gather(job)  # incoming/ holds only open series
                self.queue.set_state(job.id, "skipped", reason=why)
                return
            results, timings = self._run_route(job, route)
        except Exception as exc:
            self._fail(job, exc, route)
            return
        self.queue.add_timings(job.id, **timings)
        if self.settings.destination is None:
            self.queue.set_state(job.id, "done", route=route.name, results=[str(p) for p in results])
        else:
            self.queue.set_state(job.id, "send_pending", route=route.name, results=[str(p) for p in results])
        logger.info(f"job {job.id} ({route.name}): {len(results)} result object(s) in {time.time() - started:.1f}s")

    def _fail(self, job: Job, exc: Exception, route: Route | None = None) -> None:
        """End a job on an error: `failed` with one line, or, for a full disk, `received` again after a pause (the
        job is not at fault; it runs once there is space, as a send waits for its destination)."""
        reason = _one_line(exc)
        columns = {"route": route.name} if route is not None else {}
        if _disk_full(exc):
            delay = self.queue.retry_later(job.id, reason, self.settings.backoff_s, self.settings.backoff_max_s)
            logger.warning(f"job {job.id}: {reason}; runs again in {delay:.0f}s")
            return
        unexpected = find_medpipe_error(exc) is None
        logger.error(f"job {job.id} failed: {reason}", exc_info=unexpected)  # the traceback goes to the log only
        self.queue.set_state(job.id, "failed", reason=reason, **columns)

    def _run_route(self, job: Job, route: Route) -> tuple[list[Path], dict[str, float]]:
        """Run the route's model on the job's images and write the results to send. Doubtful results (the input guard
        says the image is of another kind, an implausible lung volume) are refused or sent with their warning in the
        SR and in status, as the route says (models.judge)."""
        from medpipe.serve import results
        from medpipe.serve.models import judge

        input_dir, files = self._gather(job)
        out_dir = self.jobs_dir / str(job.id) / "out"
        shutil.rmtree(out_dir, ignore_errors=True)  # a resumed job starts its outputs afresh
        out_dir.mkdir(parents=True)
        t0 = time.time()
        model = self._model(route)
        t1 = time.time()
        if route.task == "ct_segmentation":
            report = model.run(input_dir, out_dir)
            t2 = time.time()
            entry = report["volumes"][0]
            if "dicom_seg" not in entry["files"]:
                why = "; ".join(entry.get("warnings", [])) or "no DICOM-SEG written"
                raise MedpipeError(f"{route.bundle.name}: {why}")
            # with a SEG written, the segmenter's warnings are the input guard's
            warnings = judge(route, list(entry.get("warnings", [])), model.implausible(entry))
            seg = out_dir / entry["files"]["dicom_seg"]
            sr_path = out_dir / "measurements_sr.dcm"
            sr = results.write_ct_measurement_sr(entry, files, model.info, sr_path, warnings=warnings)
            outputs = [seg, sr]
            if entry.get("finding"):  # "no infection detected" / "infection on N of M slices", as in the SR
                self.queue.log(job.id, "info", f"{route.name}: {entry['finding']}")
        else:
            doubts = {f: model.wrong_input(f) for f in files}  # checked first: a refused series is not predicted
            warnings = judge(route, [w for found in doubts.values() for w in found], [])
            predictions = [(f, model.run(f)) for f in files]
            t2 = time.time()
            outputs = [
                results.write_classification_sr(probs, f, model.info, out_dir / f"{f.stem}_sr.dcm", warnings=doubts[f])
                for f, probs in predictions
            ]
            if route.gradcam:
                for f in files:
                    rgb = model.gradcam_overlay(f)
                    outputs.append(results.write_gradcam_sc(rgb, f, model.info, out_dir / f"{f.stem}_gradcam.dcm"))
        for warning in warnings:  # sent with the results: say so in status too
            self.queue.log(job.id, "warning", f"{route.name}: sent with a warning: {warning}")
        t3 = time.time()
        return outputs, {"model_load_s": t1 - t0, "model_s": t2 - t1, "writing_s": t3 - t2}

    def send(self, job: Job) -> None:
        from medpipe.serve.sender import SendError, SendRefused, backoff_seconds, send_files

        destination = self.settings.destination
        assert destination is not None
        started = time.time()
        try:
            send_files(job.results, destination, self.settings.ae_title)
        except SendRefused as exc:  # e.g. HTTP 400/403 from a DICOMweb service: retrying cannot help; results kept
            logger.error(f"job {job.id}: {exc}")
            self.queue.set_state(job.id, "failed", reason=f"send: {exc}")
            return
        except (SendError, OSError, RuntimeError) as exc:
            delay = backoff_seconds(job.send_attempts, self.settings.backoff_s, self.settings.backoff_max_s)
            logger.warning(f"job {job.id}: {exc}; retry in {delay:.0f}s")
            self.queue.send_failed(job.id, str(exc), delay)
            return
        self.queue.add_timings(job.id, send_s=time.time() - started)
        self.queue.set_state(job.id, "done")
        logger.info(f"job {job.id}: {len(job.results)} object(s) sent to {destination}")
