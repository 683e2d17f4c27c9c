"""The node: the Storage SCP plus one worker loop that turns quiet series into jobs, runs each job's route and sends
the results back.

Work folder layout: `queue.sqlite` (the state), `incoming/<series UID>/<SOP UID>.dcm` (received, not yet in a
job), `jobs/<id>/input/` (the job's instances, moved there) and `jobs/<id>/out/` (masks, report.json, SEG, SR).
Jobs run one at a time (a CPU node); series that arrive meanwhile wait in the queue."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from medpipe.errors import MedpipeError, find_medpipe_error
from medpipe.serve.queue import Job, JobQueue
from medpipe.serve.routing import Route, Settings
from medpipe.serve.scp import StorageSCP

logger = logging.getLogger(__name__)


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
        self.start()
        try:
            while not self.stopping.is_set():
                if not self.step():
                    self.stopping.wait(idle_sleep_s)
        finally:
            self.stop()

    def step(self) -> bool:
        """Collect quiet series, then run one job or make one send attempt; True when something was done."""
        for job_id, paths in self.queue.collect_quiet_series(self.settings.quiet_seconds):
            if job_id is None:  # the same series again: already queued or done
                for path in paths:
                    Path(path).unlink(missing_ok=True)
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
        """Move the job's instances from incoming/ to jobs/<id>/input/ (idempotent, so a resumed job finds them)."""
        input_dir = self.jobs_dir / str(job.id) / "input"
        input_dir.mkdir(parents=True, exist_ok=True)
        files = []
        for row in self.queue.job_instances(job.id):
            src = Path(row["path"])
            dst = input_dir / src.name
            if src.exists():
                os.replace(src, dst)
            if not dst.exists():
                raise MedpipeError(f"instance {row['sop_instance_uid']} was received but its file {src} is gone")
            files.append(dst)
        return input_dir, sorted(files)

    def _model(self, route: Route) -> Any:
        from medpipe.serve.models import load_model

        if route.name not in self.models:
            self.models[route.name] = load_model(route)
        return self.models[route.name]

    def process(self, job: Job) -> None:
        started = time.time()
        route, why = self.settings.route_for(job.modality, job.body_part, job.sop_class_uid)
        transfer = (job.last_received_at or started) - (job.first_received_at or started)
        self.queue.add_timings(job.id, transfer_s=transfer, queue_s=started - (job.last_received_at or started))
        if route is None:
            logger.info(f"job {job.id} ({job.modality}, {job.body_part}) skipped: {why}")
            self._gather(job)  # incoming/ holds only open series
            self.queue.set_state(job.id, "skipped", reason=why)
            return
        try:
            results, timings = self._run_route(job, route)
        except Exception as exc:
            err = find_medpipe_error(exc)
            reason = str(err) if err is not None else f"{type(exc).__name__}: {exc}"
            logger.error(f"job {job.id} failed: {reason}", exc_info=err is None)
            self.queue.set_state(job.id, "failed", reason=reason, route=route.name)
            return
        self.queue.add_timings(job.id, **timings)
        if self.settings.destination is None:
            self.queue.set_state(job.id, "done", route=route.name, results=[str(p) for p in results])
        else:
            self.queue.set_state(job.id, "send_pending", route=route.name, results=[str(p) for p in results])
        logger.info(f"job {job.id} ({route.name}): {len(results)} result object(s) in {time.time() - started:.1f}s")

    def _run_route(self, job: Job, route: Route) -> tuple[list[Path], dict[str, float]]:
        from medpipe.serve import results

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
            seg = out_dir / entry["files"]["dicom_seg"]
            sr = results.write_ct_measurement_sr(entry, files, model.info, out_dir / "measurements_sr.dcm")
            outputs = [seg, sr]
        else:
            predictions = [(f, model.run(f)) for f in files]
            t2 = time.time()
            outputs = [
                results.write_classification_sr(probs, f, model.info, out_dir / f"{f.stem}_sr.dcm")
                for f, probs in predictions
            ]
            if route.gradcam:
                for f in files:
                    rgb = model.gradcam_overlay(f)
                    outputs.append(results.write_gradcam_sc(rgb, f, model.info, out_dir / f"{f.stem}_gradcam.dcm"))
        t3 = time.time()
        return outputs, {"model_load_s": t1 - t0, "model_s": t2 - t1, "writing_s": t3 - t2}

    def send(self, job: Job) -> None:
        from medpipe.serve.sender import SendError, backoff_seconds, send_files

        destination = self.settings.destination
        assert destination is not None
        started = time.time()
        try:
            send_files(job.results, destination, self.settings.ae_title)
        except (SendError, OSError, RuntimeError) as exc:
            delay = backoff_seconds(job.send_attempts, self.settings.backoff_s, self.settings.backoff_max_s)
            logger.warning(f"job {job.id}: {exc}; retry in {delay:.0f}s")
            self.queue.send_failed(job.id, str(exc), delay)
            return
        self.queue.add_timings(job.id, send_s=time.time() - started)
        self.queue.set_state(job.id, "done")
        logger.info(f"job {job.id}: {len(job.results)} object(s) sent to {destination.ae_title}")
