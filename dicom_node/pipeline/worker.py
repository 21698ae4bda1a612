"""The claim → plan → decode → restore → derive loop, in a process of its own.

A worker owns a job only while its lease is fresh: a heartbeat thread renews it during the long
restoration, and a worker that dies simply stops renewing, so another one reclaims the job (the
node's supervisor gives it back at once). Processing twice is harmless: the derived UIDs are
deterministic, so PACS receives the same object again, never a duplicate. Every attempt counts
towards `[worker] max_attempts`, a crash included, so an image that kills its worker fails
instead of looping; a restoration that runs past `[worker] timeout_s` is recorded as such and its
worker kills itself (native code cannot be interrupted), to be restarted by the supervisor.

How a failure changes the job is decided in one place, `outcome_of`, from the error's class
(`dicom_node.errors`): refused input and wrong configuration fail the job at once, an
unavailable resource is retried on the retry policy, and anything else — an internal error — is
logged with its traceback and retried up to `[worker] max_attempts`, then failed as such.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from dicom_node.config import Config, WorkerSettings
from dicom_node.errors import ConfigurationError, InputRefused, Unavailable
from dicom_node.forward.retry import next_attempt_at
from dicom_node.imaging import MammoImage, read_mammogram, save_dataset
from dicom_node.imaging.thumbnails import thumbnail_dir, write_thumbnails
from dicom_node.joblog import JobLog, JobSnapshot
from dicom_node.pipeline.processing import Plan, Processed, restore_mammogram, warm_up
from dicom_node.qa.phantom import evaluate_due_sessions, match_rule
from dicom_node.restore.common import linear_rescale
from dicom_node.restore.mask import breast_mask

log = logging.getLogger("dicom_node.pipeline.worker")

IDLE_POLL_S = 0.5


@dataclass(frozen=True)
class Outcome:
    """What a failed attempt does to its job: the error recorded, and when to try again (None: never)."""

    error: str
    retry_at: datetime | None
    traceback: bool  # an internal error: the log gets the traceback


def outcome_of(exc: Exception, job: JobSnapshot, config: Config, now: datetime) -> Outcome:
    """The one place where a failure's class becomes the job's next state."""
    if isinstance(exc, (InputRefused, ConfigurationError)):  # the same image fails the same way
        return Outcome(str(exc), None, traceback=False)
    if isinstance(exc, Unavailable):
        return Outcome(str(exc), next_attempt_at(config.retry, job.attempts, job.received_at, now), traceback=False)
    error = f"internal error: {type(exc).__name__}: {exc}"
    if job.attempts >= config.worker.max_attempts:
        return Outcome(f"{error} (gave up after {job.attempts} attempts)", None, traceback=True)
    return Outcome(error, next_attempt_at(config.retry, job.attempts, job.received_at, now), traceback=True)


def worker_name(node_id: str | None = None, pid: int | None = None) -> str:
    """ "NODE/HOST:PID" (or "HOST:PID" for a worker started on its own): the lease owner it writes, so
    the node that started it can give its jobs back when it dies."""
    name = f"{socket.gethostname()}:{pid or os.getpid()}"
    return f"{node_id}/{name}" if node_id else name


def kill_self() -> None:
    """End this worker at once: the only way out of native code that does not return."""
    os.kill(os.getpid(), signal.SIGKILL)


class _Heartbeat:
    """Renews a job's lease every heartbeat_s until stopped; remembers if the lease was lost, and
    calls `on_timeout` (once) when the job has run for timeout_s."""

    def __init__(
        self,
        joblog: JobLog,
        job_id: int,
        worker: str,
        settings: WorkerSettings,
        on_timeout: Callable[[], None],
    ):
        self.lost = False
        self._stop = threading.Event()
        self._deadline = time.monotonic() + settings.timeout_s
        self._thread = threading.Thread(
            target=self._run, args=(joblog, job_id, worker, settings, on_timeout), daemon=True
        )

    def _run(
        self, joblog: JobLog, job_id: int, worker: str, settings: WorkerSettings, on_timeout: Callable[[], None]
    ) -> None:
        every_s = min(settings.heartbeat_s, settings.timeout_s)
        while not self._stop.wait(max(0.0, min(every_s, self._deadline - time.monotonic()))):
            if time.monotonic() >= self._deadline:
                on_timeout()
                return
            if not joblog.heartbeat(job_id, worker, settings.lease_s):
                self.lost = True
                return

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Worker:
    def __init__(
        self,
        config: Config,
        joblog: JobLog,
        name: str | None = None,
        on_timeout: Callable[[], None] = kill_self,
    ):
        self.config = config
        self.joblog = joblog
        self.name = name or worker_name()
        self.derived_dir = config.data_dir / "derived"
        self.on_timeout = on_timeout

    def run(self, stop: threading.Event) -> None:
        """Load what the profiles need, then process jobs until `stop` is set (finishing the job in hand)."""
        log.info("worker %s started", self.name)
        for problem in warm_up(self.config):
            log.warning("worker %s: %s", self.name, problem)
        while not stop.is_set():
            # idle: evaluate a due phantom QA session, stepping aside as soon as a job is due
            if not self.run_once() and not evaluate_due_sessions(
                self.config, self.joblog, self.name, yield_to=lambda: stop.is_set() or self.joblog.jobs_due() > 0
            ):
                stop.wait(IDLE_POLL_S)
        log.info("worker %s stopped", self.name)

    def run_once(self) -> bool:
        """Claim and process one job; False when the queue had none ready."""
        settings = self.config.worker
        job = self.joblog.claim_job(self.name, settings.lease_s)
        if job is None:
            return False
        log.info("job %s: claimed (%s, attempt %d)", job.id, job.sop_instance_uid, job.attempts)
        with _Heartbeat(self.joblog, job.id, self.name, settings, lambda: self._timed_out(job)) as beat:
            try:
                self._process(job)
            except Exception as exc:
                outcome = outcome_of(exc, job, self.config, datetime.now(UTC))
                when = (
                    "failed"
                    if outcome.retry_at is None
                    else f"retry at {outcome.retry_at.isoformat(timespec='seconds')}"
                )
                log.error("job %s: %s: %s", job.id, when, outcome.error, exc_info=outcome.traceback)
                self.joblog.job_failed(job.id, self.name, outcome.error, retry_at=outcome.retry_at)
        if beat.lost:
            log.warning("job %s: lease was lost while processing; another worker may have redone it", job.id)
        return True

    def _timed_out(self, job: JobSnapshot) -> None:
        """Record the timeout as the attempt's failure (retried, or failed at the cap), then stop this worker."""
        limit = self.config.worker.timeout_s
        error = f"restoration ran past the {limit:g} s limit ([worker] timeout_s); its worker was stopped"
        if job.attempts >= self.config.worker.max_attempts:
            error, retry_at = f"{error} (gave up after {job.attempts} attempts)", None
        else:
            retry_at = next_attempt_at(self.config.retry, job.attempts, job.received_at, datetime.now(UTC))
        log.error("job %s: %s", job.id, error)
        self.joblog.job_failed(job.id, self.name, error, retry_at=retry_at)
        self.on_timeout()

    def _process(self, job: JobSnapshot) -> None:
        profile = self.config.profiles.get(job.profile)
        if profile is None:
            raise ConfigurationError(f"profile {job.profile!r} is not in the configuration")
        plan = Plan.of_profile(job.profile, profile)  # decided now, recorded, then used as recorded
        self.joblog.record_plan(
            job.id,
            self.name,
            pipeline=plan.pipeline,
            restorer_options=dict(plan.options),
            dose_fraction=plan.dose_fraction,
        )
        started = time.perf_counter()
        image = read_mammogram(Path(job.input_path))
        # before "decoded": a session is not evaluated while one of its images may still be undecoded
        rule = match_rule(self.config.phantom_qa, image.dataset)
        if rule is not None:
            self.joblog.mark_phantom_image(job.id, rule.name, rule.quiet_minutes)
        self.joblog.record_stage(job.id, "decoded", time.perf_counter() - started)

        processed = restore_mammogram(image, self.config, plan)
        self.joblog.record_stage(job.id, "restored", processed.timings.get("total", 0.0))

        started = time.perf_counter()
        derived_uid = str(processed.dataset.SOPInstanceUID)
        self.derived_dir.mkdir(parents=True, exist_ok=True)
        derived_path = self.derived_dir / f"{derived_uid}.dcm"
        save_dataset(processed.dataset, derived_path)
        self.joblog.record_stage(
            job.id, "derived", processed.timings.get("derive", 0.0) + time.perf_counter() - started
        )

        self._write_thumbnails(job, image, processed, plan)
        deliveries = [(name, "derived") for name in profile.destinations]
        if profile.forward_original:
            deliveries += [(name, "original") for name in profile.destinations]
        self.joblog.job_processed(
            job.id,
            self.name,
            derived_path=str(derived_path),
            derived_sop_instance_uid=derived_uid,
            qc=processed.qc,
            timings=processed.timings,
            device=processed.provenance.device,
            model_digest=processed.provenance.model_digest,
            model_name=processed.provenance.model_name,
            deliveries=deliveries,
            qc_flags=processed.qc_flags,
            hold=profile.hold_flagged,
        )
        log.info("job %s: restored → %s (%.1f s)", job.id, derived_uid, processed.timings.get("total", 0.0))
        for flag in processed.qc_flags:
            log.warning("job %s: QC flag: %s", job.id, flag["message"])

    def _write_thumbnails(self, job: JobSnapshot, image: MammoImage, processed: Processed, plan: Plan) -> None:
        """Before / after / difference views for the dashboard; a failure here costs the views, not the image."""
        if processed.restored is None:
            return
        try:
            before = linear_rescale(image.pixels.astype(np.float64), processed.noise, plan.dose_fraction)
            write_thumbnails(
                thumbnail_dir(self.config.data_dir, job.id),
                before,
                processed.restored,
                processed.noise.offset,
                breast_mask(image.pixels, processed.noise),
            )
        except (OSError, ValueError) as exc:
            log.warning("job %s: thumbnails not written: %s", job.id, exc)


def run_worker(config: Config, stop: threading.Event | None = None, node_id: str | None = None) -> None:
    """Entry point of a worker process (also `dicom-node worker`)."""
    stop = stop or threading.Event()
    joblog = JobLog(config.database_url, config.worker.max_attempts, config.database.busy_timeout_s)
    Worker(config, joblog, worker_name(node_id)).run(stop)
