"""Sends due deliveries: claim one from the job log, send it, record the outcome.

Transient failures are retried on the configured policy until max_age_h after the image was
received; permanent ones stop at once and show as failed for IT to act on. The scheduler runs
`dispatch_due` every second, a few instances at a time; each claim is atomic, so no delivery is
sent twice at once.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydicom.uid import generate_uid

from dicom_node.config import Config
from dicom_node.forward.destinations import Destination, NetworkDestination, SendResult, make_destination
from dicom_node.forward.retry import next_attempt_at
from dicom_node.joblog import DeliverySnapshot, JobLog

log = logging.getLogger("dicom_node.forward")

LEASE_MARGIN_S = 60.0


class Dispatcher:
    def __init__(self, config: Config, joblog: JobLog, name: str | None = None):
        self.config = config
        self.joblog = joblog
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:dispatch"
        self.destinations: dict[str, Destination] = {
            d.name: make_destination(d, config.node.ae_title, base_dir=config.base_dir, file_mode=config.node.file_mode)
            for d in config.destinations
        }
        longest = max((d.timeout_s for d in config.destinations), default=0.0)
        self.lease_s = longest + LEASE_MARGIN_S

    def dispatch_due(self) -> int:
        """Send every delivery that is due now; returns how many were attempted."""
        for overdue in self.joblog.overdue_commitments():
            self.failed(overdue, "no storage commitment report in time", status=None, transient=True)
        attempted = 0
        while (delivery := self.joblog.claim_delivery(self.name, self.lease_s)) is not None:
            self.send(delivery)
            attempted += 1
        return attempted

    def send(self, delivery: DeliverySnapshot) -> SendResult:
        job = self.joblog.get_job(delivery.job_id)
        if job is None:  # a delivery's job is never deleted before it (foreign key)
            raise RuntimeError(f"delivery {delivery.id}: job {delivery.job_id} is not in the job log")
        destination = self.destinations.get(delivery.destination)
        if destination is None:
            result = SendResult(
                False, False, None, f"destination {delivery.destination!r} is no longer configured", 0.0
            )
        else:
            source = job.derived_path if delivery.kind == "derived" else job.input_path
            if source is None:  # a "derived" delivery is queued only with its derived image
                raise RuntimeError(f"job {job.id}: delivery {delivery.id} of the derived image, but none is recorded")
            if isinstance(destination, NetworkDestination) and destination.commitment_timeout_s is not None:
                return self._send_with_commitment(delivery, destination, Path(source), destination.commitment_timeout_s)
            result = destination.send(Path(source))
        if result.ok:
            self.joblog.delivery_sent(delivery.id, status=result.status or 0, send_s=result.seconds)
            log.info("job %s: %s sent to %s in %.2f s", job.id, delivery.kind, delivery.destination, result.seconds)
            return result
        self.failed(delivery, result.message, status=result.status, transient=result.transient)
        return result

    def _send_with_commitment(
        self, delivery: DeliverySnapshot, destination: NetworkDestination, source: Path, timeout_s: float
    ) -> SendResult:
        """Store, then ask PACS to commit: the send counts once its report says so (or fails at `timeout_s`)."""
        transaction_uid = generate_uid()
        self.joblog.expect_commitment(delivery.id, transaction_uid)  # before PACS can answer
        result = destination.send(source, commitment_uid=transaction_uid)
        if not result.ok:
            self.failed(delivery, result.message, status=result.status, transient=result.transient)
            return result
        commit_by = datetime.now(UTC) + timedelta(seconds=timeout_s)
        if self.joblog.delivery_stored(
            delivery.id,
            transaction_uid=transaction_uid,
            status=result.status or 0,
            send_s=result.seconds,
            commit_by=commit_by,
        ):
            log.info(
                "job %s: %s stored on %s, awaiting its storage commitment",
                delivery.job_id,
                delivery.kind,
                delivery.destination,
            )
        return result

    def failed(self, delivery: DeliverySnapshot, error: str, *, status: int | None, transient: bool) -> None:
        """Record a failed send (or commitment): retried on the policy when `transient`, else failed for good."""
        job = self.joblog.get_job(delivery.job_id)
        retry_at = None
        if transient and job is not None:
            retry_at = next_attempt_at(self.config.retry, delivery.attempts, job.received_at, datetime.now(UTC))
        self.joblog.delivery_failed(delivery.id, error=error, status=status, retry_at=retry_at)
        if retry_at is None:
            log.error(
                "job %s: %s to %s failed for good: %s", delivery.job_id, delivery.kind, delivery.destination, error
            )
        else:
            log.warning(
                "job %s: %s to %s failed (%s); retry at %s",
                delivery.job_id,
                delivery.kind,
                delivery.destination,
                error,
                retry_at.isoformat(timespec="seconds"),
            )
