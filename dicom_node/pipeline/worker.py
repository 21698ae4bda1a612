"""The claim → plan → decode → restore → derive loop, in a process of its own.

A worker owns a job only while its lease is fresh: a heartbeat thread renews it during the long
restoration, and a worker that dies simply stops renewing, so another one reclaims the job.
Processing twice is harmless: the derived UIDs are deterministic, so PACS receives the same
object again, never a duplicate.

How a failure changes the job is decided in one place, `outcome_of`, from the error's class
(`dicom_node.errors`): refused input and wrong configuration fail the job at once, an
unavailable resource is retried on the retry policy, and anything else — an internal error — is
logged with its traceback and retried up to `[worker] max_attempts`, then failed as such.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from dicom_node.config import Config
from dicom_node.errors import ConfigurationError, InputRefused, Unavailable
from dicom_node.forward.retry import next_attempt_at
from dicom_node.imaging import read_mammogram, save_dataset
from dicom_node.joblog import JobLog, JobSnapshot
from dicom_node.pipeline.processing import Plan, restore_mammogram

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


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class _Heartbeat:
    """Renews a job's lease every heartbeat_s until stopped; remembers if the lease was lost."""

    def __init__(self, joblog: JobLog, job_id: int, worker: str, lease_s: float, every_s: float):
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(joblog, job_id, worker, lease_s, every_s), daemon=True)

    def _run(self, joblog: JobLog, job_id: int, worker: str, lease_s: float, every_s: float) -> None:
        while not self._stop.wait(every_s):
            if not joblog.heartbeat(job_id, worker, lease_s):
                self.lost = True
                return

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Worker:
    def __init__(self, config: Config, joblog: JobLog, name: str | None = None):
        self.config = config
        self.joblog = joblog
        self.name = name or worker_name()
        self.derived_dir = config.data_dir / "derived"

    def run(self, stop: threading.Event) -> None:
        """Process jobs until `stop` is set (finishing the job in hand)."""
        log.info("worker %s started", self.name)
        while not stop.is_set():
            if not self.run_once():
                stop.wait(IDLE_POLL_S)
        log.info("worker %s stopped", self.name)

    def run_once(self) -> bool:
        """Claim and process one job; False when the queue had none ready."""
        settings = self.config.worker
        job = self.joblog.claim_job(self.name, settings.lease_s)
        if job is None:
            return False
        log.info("job %s: claimed (%s, attempt %d)", job.id, job.sop_instance_uid, job.attempts)
        with _Heartbeat(self.joblog, job.id, self.name, settings.lease_s, settings.heartbeat_s) as beat:
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
        )
        log.info("job %s: restored → %s (%.1f s)", job.id, derived_uid, processed.timings.get("total", 0.0))


def run_worker(config: Config, stop: threading.Event | None = None) -> None:
    """Entry point of a worker process (also `dicom-node worker`)."""
    stop = stop or threading.Event()
    Worker(config, JobLog(config.database_url)).run(stop)
