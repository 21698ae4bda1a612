"""The claim → decode → restore → derive loop, in a process of its own.

A worker owns a job only while its lease is fresh: a heartbeat thread renews it during the long
restoration, and a worker that dies simply stops renewing, so another one reclaims the job.
Processing twice is harmless: the derived UIDs are deterministic, so PACS receives the same
object again, never a duplicate.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from dicom_node.config import Config, ConfigError
from dicom_node.imaging import ImagingError, read_mammogram, save_dataset
from dicom_node.joblog import JobLog
from dicom_node.pipeline.processing import ProcessingError, restore_mammogram, restorer_options

log = logging.getLogger("dicom_node.pipeline.worker")

IDLE_POLL_S = 0.5


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class _Heartbeat:
    """Renews a job's lease every heartbeat_s until stopped; remembers if the lease was lost."""

    def __init__(self, joblog: JobLog, job_id: int, worker: str, lease_s: float, every_s: float):
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(joblog, job_id, worker, lease_s, every_s), daemon=True
        )

    def _run(self, joblog: JobLog, job_id: int, worker: str, lease_s: float, every_s: float) -> None:
        while not self._stop.wait(every_s):
            if not joblog.heartbeat(job_id, worker, lease_s):
                self.lost = True
                return

    def __enter__(self) -> "_Heartbeat":
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
            except (ImagingError, ProcessingError, ConfigError) as exc:
                # The image or the setup is wrong: trying again would fail the same way.
                log.error("job %s: failed: %s", job.id, exc)
                self.joblog.job_failed(job.id, self.name, str(exc), retry_at=None)
            except Exception as exc:  # noqa: BLE001 - anything else may be transient (disk, memory)
                log.exception("job %s: error", job.id)
                now = datetime.now(timezone.utc)
                retry_at = self.config.retry.retry_at(job.attempts, job.received_at, now)
                self.joblog.job_failed(job.id, self.name, f"{type(exc).__name__}: {exc}", retry_at=retry_at)
        if beat.lost:
            log.warning("job %s: lease was lost while processing; another worker may have redone it", job.id)
        return True

    def _process(self, job) -> None:
        profile = self.config.profiles.get(job.profile)
        if profile is None:
            raise ProcessingError(f"profile {job.profile!r} is not in the configuration")
        started = time.perf_counter()
        image = read_mammogram(Path(job.input_path))
        self.joblog.record_stage(job.id, "decoded", time.perf_counter() - started)

        processed = restore_mammogram(
            image,
            self.config,
            pipeline=profile.pipeline,
            dose_fraction=profile.dose_fraction,
            profile=job.profile,
            model_name=profile.model or None,
            options=restorer_options(self.config, profile.pipeline, model=profile.model, blend=profile.blend),
        )
        self.joblog.record_stage(job.id, "restored", processed.timings.get("total", 0.0))

        started = time.perf_counter()
        derived_uid = str(processed.dataset.SOPInstanceUID)
        self.derived_dir.mkdir(parents=True, exist_ok=True)
        derived_path = self.derived_dir / f"{derived_uid}.dcm"
        save_dataset(processed.dataset, derived_path)
        self.joblog.record_stage(job.id, "derived", processed.timings.get("derive", 0.0) + time.perf_counter() - started)

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
            device=processed.device,
            model_digest=processed.model_digest,
            model_name=processed.model_name,
            deliveries=deliveries,
        )
        log.info("job %s: restored → %s (%.1f s)", job.id, derived_uid, processed.timings.get("total", 0.0))


def run_worker(config: Config, stop: threading.Event | None = None) -> None:
    """Entry point of a worker process (also `dicom-node worker`)."""
    stop = stop or threading.Event()
    Worker(config, JobLog(config.database_url)).run(stop)
