"""Every state change of the job log: the queue of jobs and of their deliveries.

The tables are the queue. A worker claims the oldest due row with a lease (owner + expiry),
renews it with heartbeats and ends it by recording the outcome. A lease that runs out (the
worker died) makes the row claimable again, so an image acknowledged to the modality is never
lost; processing is at-least-once, made harmless by the deterministic derived UIDs.

A claim selects one due row and updates it in the same write transaction: SQLite serialises
those (BEGIN IMMEDIATE), PostgreSQL locks the row and lets other claimers skip it
(FOR UPDATE SKIP LOCKED), so one code path is atomic on both.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, and_, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.errors import InputRefused

from .db import WRITE, make_engine, upgrade
from .tables import (
    DELIVERY_KINDS,
    Delivery,
    DeliverySnapshot,
    DeliveryStatus,
    Job,
    JobSnapshot,
    JobStatus,
)

STAGES = {"decoded": "decode", "restored": "restore", "derived": "derive"}
"""Stage name → prefix of its duration column (`decoded` sets decoded_at and decode_s)."""

_FINISHED_DELIVERIES = (DeliveryStatus.sent, DeliveryStatus.cancelled)


def utcnow() -> datetime:
    return datetime.now(UTC)


class JobLog:
    """The job log on one database: opening it migrates the schema to the newest revision."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        upgrade(self.engine)
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write = sessionmaker(self.engine.execution_options(**WRITE), expire_on_commit=False)

    def close(self) -> None:
        """Close pooled connections (also call it in a child process after a fork)."""
        self.engine.dispose()

    @contextmanager
    def _transaction(self) -> Iterator[Session]:
        with self._write.begin() as session:
            yield session

    # --- receiving -------------------------------------------------------------------------

    def record_received(
        self,
        *,
        sop_instance_uid: str,
        study_instance_uid: str,
        series_instance_uid: str,
        sop_class_uid: str,
        transfer_syntax_uid: str,
        calling_ae: str,
        called_ae: str,
        peer_host: str | None,
        station_name: str | None,
        detector_serial: str | None,
        profile: str,
        input_path: str,
        input_sha256: str,
        input_bytes: int,
    ) -> int:
        """Commit a job for a spooled image; the receiver answers Success only after this."""
        job = Job(
            sop_instance_uid=sop_instance_uid,
            study_instance_uid=study_instance_uid,
            series_instance_uid=series_instance_uid,
            sop_class_uid=sop_class_uid,
            transfer_syntax_uid=transfer_syntax_uid,
            calling_ae=calling_ae,
            called_ae=called_ae,
            peer_host=peer_host,
            station_name=station_name,
            detector_serial=detector_serial,
            profile=profile,
            input_path=input_path,
            input_sha256=input_sha256,
            input_bytes=input_bytes,
            status=JobStatus.received,
            attempts=0,
            received_at=utcnow(),
        )
        with self._transaction() as session:
            session.add(job)
            session.flush()
            return job.id

    # --- processing ------------------------------------------------------------------------

    def claim_job(self, worker: str, lease_s: float, now: datetime | None = None) -> JobSnapshot | None:
        """Take the oldest due job: 'received' (past any retry delay) or 'processing' whose lease expired."""
        now = now or utcnow()
        due = or_(
            and_(Job.status == JobStatus.received, or_(Job.next_attempt_at.is_(None), Job.next_attempt_at <= now)),
            and_(Job.status == JobStatus.processing, Job.lease_expires_at < now),
        )
        with self._transaction() as session:
            job = session.scalars(
                select(Job).where(due).order_by(Job.id).limit(1).with_for_update(skip_locked=True)
            ).first()
            if job is None:
                return None
            job.status = JobStatus.processing
            job.lease_owner = worker
            job.lease_expires_at = now + timedelta(seconds=lease_s)
            job.claimed_at = now
            job.attempts += 1
            job.next_attempt_at = None
            return JobSnapshot.of(job)

    def heartbeat(self, job_id: int, worker: str, lease_s: float) -> bool:
        """Extend the lease; False means another worker (or a cancel) took the job: stop working on it.

        A lease that ran out but was not yet taken is still renewed: nobody else acted on it.
        """
        with self._transaction() as session:
            # An UPDATE's result is a CursorResult (it has rowcount); Session.execute is typed as Result.
            result = cast(
                CursorResult[Any],
                session.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.status == JobStatus.processing, Job.lease_owner == worker)
                    .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s))
                ),
            )
            return result.rowcount == 1

    def record_plan(
        self,
        job_id: int,
        worker: str,
        *,
        pipeline: str,
        restorer_options: dict[str, Any],
        dose_fraction: float,
    ) -> bool:
        """Record how a claimed job will be restored (decided from its profile); False if the lease is lost.

        The worker restores with exactly what is recorded here, so the job row says what was done.
        """
        with self._transaction() as session:
            job = self._leased_job(session, job_id, worker)
            if job is None:
                return False
            job.pipeline = pipeline
            job.restorer_options = dict(restorer_options)
            job.dose_fraction = dose_fraction
            job.model_name = restorer_options.get("model") or None
            job.model_digest = None
            return True

    def record_stage(self, job_id: int, stage: str, duration_s: float) -> None:
        """Stamp the end of one processing stage ('decoded', 'restored' or 'derived') and its duration."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {sorted(STAGES)}")
        with self._transaction() as session:
            job = self._job(session, job_id)
            setattr(job, f"{stage}_at", utcnow())
            setattr(job, f"{STAGES[stage]}_s", duration_s)

    def job_processed(
        self,
        job_id: int,
        worker: str,
        *,
        derived_path: str,
        derived_sop_instance_uid: str,
        qc: dict[str, Any],
        timings: dict[str, float],
        device: str,
        model_digest: str | None,
        deliveries: Sequence[tuple[str, str]],
        model_name: str | None = None,
    ) -> bool:
        """Record the derived image and queue one delivery per (destination, kind), due now.

        Returns False (and changes nothing) when the worker no longer holds the lease: the job's
        new owner records its own, identical result. With no deliveries the job is done at once.
        """
        for _, kind in deliveries:
            if kind not in DELIVERY_KINDS:
                raise ValueError(f"unknown delivery kind {kind!r}; expected one of {DELIVERY_KINDS}")
        now = utcnow()
        with self._transaction() as session:
            job = self._leased_job(session, job_id, worker)
            if job is None:
                return False
            job.derived_path = derived_path
            job.derived_sop_instance_uid = derived_sop_instance_uid
            job.qc = qc
            job.timings = {**(job.timings or {}), **timings}
            job.device = device
            job.model_digest = model_digest
            job.model_name = model_name  # the model a restorer used (resolved when the profile named none)
            job.lease_owner = job.lease_expires_at = None
            job.status = JobStatus.forwarding
            session.add_all(
                Delivery(
                    job_id=job_id,
                    destination=destination,
                    kind=kind,
                    attempts=0,
                    status=DeliveryStatus.pending,
                    next_attempt_at=now,
                )
                for destination, kind in deliveries
            )
            session.flush()
            self._finish_if_delivered(session, job, now)
            return True

    def job_failed(self, job_id: int, worker: str, error: str, *, retry_at: datetime | None) -> bool:
        """Give the job back: claimable again from `retry_at`, or failed for good when it is None.

        Returns False (and changes nothing) when the worker no longer holds the lease.
        """
        with self._transaction() as session:
            job = self._leased_job(session, job_id, worker)
            if job is None:
                return False
            job.last_error = error
            job.lease_owner = job.lease_expires_at = None
            job.status = JobStatus.failed if retry_at is None else JobStatus.received
            job.next_attempt_at = retry_at
            return True

    # --- forwarding ------------------------------------------------------------------------

    def claim_delivery(
        self,
        worker: str,
        lease_s: float,
        now: datetime | None = None,
    ) -> DeliverySnapshot | None:
        """Take the delivery due first: 'pending' and due, or 'sending' whose lease expired.

        Nothing of a cancelled job is taken, even a send that failed or was reclaimed after the
        cancel put it back to 'pending'; retrying the job resumes it.
        """
        now = now or utcnow()
        due = or_(
            and_(
                Delivery.status == DeliveryStatus.pending,
                or_(Delivery.next_attempt_at.is_(None), Delivery.next_attempt_at <= now),
            ),
            and_(Delivery.status == DeliveryStatus.sending, Delivery.lease_expires_at < now),
        )
        with self._transaction() as session:
            delivery = session.scalars(
                select(Delivery)
                .join(Job)
                .where(due, Job.status != JobStatus.cancelled)
                .order_by(Delivery.next_attempt_at, Delivery.id)
                .limit(1)
                .with_for_update(of=Delivery, skip_locked=True)
            ).first()
            if delivery is None:
                return None
            delivery.status = DeliveryStatus.sending
            delivery.lease_owner = worker
            delivery.lease_expires_at = now + timedelta(seconds=lease_s)
            delivery.attempts += 1
            return DeliverySnapshot.of(delivery)

    def delivery_sent(self, delivery_id: int, *, status: int, send_s: float) -> None:
        """Record an acknowledged send; the job is done once every delivery is sent or cancelled."""
        now = utcnow()
        with self._transaction() as session:
            delivery = self._delivery(session, delivery_id)
            delivery.status = DeliveryStatus.sent
            delivery.last_status = status
            delivery.send_s = send_s
            delivery.sent_at = now
            delivery.lease_owner = delivery.lease_expires_at = None
            self._finish_if_delivered(session, self._job(session, delivery.job_id), now)

    def delivery_failed(
        self,
        delivery_id: int,
        *,
        error: str,
        status: int | None,
        retry_at: datetime | None,
    ) -> None:
        """Record a failed send: pending again from `retry_at`, or (None) failed for good with its job."""
        with self._transaction() as session:
            delivery = self._delivery(session, delivery_id)
            delivery.last_error = error
            delivery.last_status = status
            delivery.lease_owner = delivery.lease_expires_at = None
            delivery.next_attempt_at = retry_at
            delivery.status = DeliveryStatus.failed if retry_at is None else DeliveryStatus.pending
            if retry_at is None:
                job = self._job(session, delivery.job_id)
                if job.status == JobStatus.forwarding:
                    job.status = JobStatus.failed
                    job.last_error = f"{delivery.destination}: {error}"

    # --- recovery and IT commands ------------------------------------------------------------

    def reclaim_expired(self, now: datetime | None = None) -> int:
        """Put rows whose lease ran out back in the queue (their worker died); returns how many."""
        now = now or utcnow()
        with self._transaction() as session:
            jobs = cast(
                CursorResult[Any],
                session.execute(
                    update(Job)
                    .where(Job.status == JobStatus.processing, Job.lease_expires_at < now)
                    .values(status=JobStatus.received, lease_owner=None, lease_expires_at=None)
                ),
            )
            deliveries = cast(
                CursorResult[Any],
                session.execute(
                    update(Delivery)
                    .where(Delivery.status == DeliveryStatus.sending, Delivery.lease_expires_at < now)
                    .values(status=DeliveryStatus.pending, lease_owner=None, lease_expires_at=None, next_attempt_at=now)
                ),
            )
            return jobs.rowcount + deliveries.rowcount

    def retry(self, job_id: int) -> bool:
        """Queue a failed or cancelled job again, due now; False if it is already queued.

        Without a derived image it is processed again; with one, only its failed or cancelled
        deliveries are sent again (attempts reset, so the backoff starts from the beginning).
        Raises InputRefused for an unknown job or one that is processing or done.
        """
        now = utcnow()
        with self._transaction() as session:
            job = self._job(session, job_id)
            if job.status in (JobStatus.received, JobStatus.forwarding):
                return False
            if job.status not in (JobStatus.failed, JobStatus.cancelled):
                raise InputRefused(f"job {job_id} is {job.status}; only failed or cancelled jobs can be retried")
            if job.derived_path is None:
                job.status = JobStatus.received
                job.next_attempt_at = None
                return True
            session.execute(
                update(Delivery)
                .where(
                    Delivery.job_id == job_id, Delivery.status.in_([DeliveryStatus.failed, DeliveryStatus.cancelled])
                )
                .values(status=DeliveryStatus.pending, next_attempt_at=now, attempts=0)
            )
            job.status = JobStatus.forwarding
            self._finish_if_delivered(session, job, now)
            return True

    def cancel(self, job_id: int) -> bool:
        """Stop a job and its pending deliveries; False if it was cancelled already.

        A worker holding it loses the lease (its heartbeat returns False); a send in flight
        finishes but is not retried. Raises InputRefused for an unknown job or one that is done.
        """
        with self._transaction() as session:
            job = self._job(session, job_id)
            if job.status == JobStatus.cancelled:
                return False
            if job.status == JobStatus.done:
                raise InputRefused(f"job {job_id} is done; there is nothing to cancel")
            job.status = JobStatus.cancelled
            job.lease_owner = job.lease_expires_at = None
            session.execute(
                update(Delivery)
                .where(Delivery.job_id == job_id, Delivery.status == DeliveryStatus.pending)
                .values(status=DeliveryStatus.cancelled)
            )
            return True

    # --- reading ---------------------------------------------------------------------------

    def get_job(self, job_id: int) -> JobSnapshot | None:
        with self._read() as session:
            job = session.get(Job, job_id)
            return None if job is None else JobSnapshot.of(job)

    def find_by_sop_instance(self, uid: str) -> list[JobSnapshot]:
        """Every job of one SOP Instance UID, oldest first (for the duplicate policy)."""
        with self._read() as session:
            jobs = session.scalars(select(Job).where(Job.sop_instance_uid == uid).order_by(Job.id))
            return [JobSnapshot.of(job) for job in jobs]

    def list_jobs(
        self,
        status: JobStatus | str | None = None,
        since: datetime | None = None,
        limit: int | None = 100,
    ) -> list[JobSnapshot]:
        """The newest jobs first, optionally only one status and only those received since `since`.

        At most `limit` jobs; None: all of them.
        """
        query = select(Job).order_by(Job.id.desc()).limit(limit)
        if status is not None:
            query = query.where(Job.status == JobStatus(status))
        if since is not None:
            query = query.where(Job.received_at >= since)
        with self._read() as session:
            return [JobSnapshot.of(job) for job in session.scalars(query)]

    def deliveries(self, job_id: int) -> list[DeliverySnapshot]:
        with self._read() as session:
            rows = session.scalars(select(Delivery).where(Delivery.job_id == job_id).order_by(Delivery.id))
            return [DeliverySnapshot.of(row) for row in rows]

    # --- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _job(session: Session, job_id: int) -> Job:
        job = session.get(Job, job_id)
        if job is None:
            raise InputRefused(f"no job {job_id}")
        return job

    @staticmethod
    def _delivery(session: Session, delivery_id: int) -> Delivery:
        delivery = session.get(Delivery, delivery_id)
        if delivery is None:
            raise ValueError(f"no delivery {delivery_id}")
        return delivery

    @staticmethod
    def _leased_job(session: Session, job_id: int, worker: str) -> Job | None:
        job = JobLog._job(session, job_id)
        if job.status != JobStatus.processing or job.lease_owner != worker:
            return None
        return job

    @staticmethod
    def _finish_if_delivered(session: Session, job: Job, now: datetime) -> None:
        """A forwarding job is done when none of its deliveries is left to send."""
        if job.status != JobStatus.forwarding:
            return
        unfinished = session.scalar(
            select(func.count())
            .select_from(Delivery)
            .where(Delivery.job_id == job.id, Delivery.status.not_in(_FINISHED_DELIVERIES))
        )
        if unfinished == 0:
            job.status = JobStatus.done
            job.completed_at = now
