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

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, Select, and_, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.errors import InputRefused

from .db import BUSY_TIMEOUT_S, WRITE, make_engine, upgrade
from .tables import (
    DELIVERY_KINDS,
    AuditEvent,
    AuditOutcome,
    AuditSnapshot,
    Delivery,
    DeliverySnapshot,
    DeliveryStatus,
    Job,
    JobEvent,
    JobEventSnapshot,
    JobSnapshot,
    JobStatus,
    QaSession,
    QaSessionSnapshot,
    QaSessionStatus,
)

STAGES = {"decoded": "decode", "restored": "restore", "derived": "derive"}
"""Stage name → prefix of its duration column (`decoded` sets decoded_at and decode_s)."""

_FINISHED_DELIVERIES = (DeliveryStatus.sent, DeliveryStatus.cancelled)
_COMMAND_AUDIT = {
    "retry": "job-retried",
    "cancel": "job-cancelled",
    "resend": "job-resent",
    "release": "job-released",
    "reprocess": "job-reprocessed",
}
DEFAULT_MAX_ATTEMPTS = 3  # [worker] max_attempts unless the node says otherwise


@dataclass(frozen=True)
class Change:
    """What an IT command did: `changed` False means nothing was changed, and `message` says why."""

    changed: bool
    message: str

    def __bool__(self) -> bool:
        return self.changed


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class JobFilter:
    """Which jobs a list shows (the CLI's flags, the dashboard's filters, a report's period): every
    criterion given must hold. `station` matches the station name or the calling AE title."""

    status: JobStatus | str | None = None
    since: datetime | None = None  # received at or after
    until: datetime | None = None  # received before
    station: str | None = None
    detector: str | None = None
    profile: str | None = None
    flagged: bool | None = None  # True: only jobs with a QC flag; False: only jobs without
    qa_session_id: int | None = None

    def apply(self, query: Select[Any]) -> Select[Any]:
        if self.status is not None:
            query = query.where(Job.status == JobStatus(self.status))
        if self.since is not None:
            query = query.where(Job.received_at >= self.since)
        if self.until is not None:
            query = query.where(Job.received_at < self.until)
        if self.station:
            query = query.where(or_(Job.station_name == self.station, Job.calling_ae == self.station))
        if self.detector:
            query = query.where(Job.detector_serial == self.detector)
        if self.profile:
            query = query.where(Job.profile == self.profile)
        if self.flagged is not None:
            query = query.where(Job.qc_flags.is_not(None) if self.flagged else Job.qc_flags.is_(None))
        if self.qa_session_id is not None:
            query = query.where(Job.qa_session_id == self.qa_session_id)
        return query


class JobLog:
    """The job log on one database: opening it migrates the schema to the newest revision.

    `max_attempts` caps how often a job is claimed: a job whose worker died (a crash, a kill, a
    timeout) on its last attempt fails with the reason instead of being claimed again.
    """

    def __init__(
        self, url: str, max_attempts: int = DEFAULT_MAX_ATTEMPTS, busy_timeout_s: float = BUSY_TIMEOUT_S
    ) -> None:
        self.max_attempts = max_attempts
        self.engine = make_engine(url, busy_timeout_s)
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
        pass_through_to: Sequence[str] = (),
        patient_id: str | None = None,
    ) -> int:
        """Commit a job for a spooled image; the receiver answers Success only after this.

        With `pass_through_to` (destinations) the image is not restored: the job is forwarding at
        once, with one send of the original to each, due now. `patient_id` goes only to the audit
        trail (an ATNA record names the patient whose images moved), never to the job row or logs."""
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
        if pass_through_to:
            job.status = JobStatus.forwarding
        with self._transaction() as session:
            session.add(job)
            session.flush()
            self._event(
                session, job.id, "received", f"from {calling_ae} ({peer_host or 'unknown host'}), profile {profile}"
            )
            self._audit(
                session,
                "instance-received",
                actor=calling_ae,
                address=peer_host,
                job_id=job.id,
                called_ae=called_ae,
                sop_class_uid=sop_class_uid,
                sop_instance_uid=sop_instance_uid,
                study_instance_uid=study_instance_uid,
                patient_id=patient_id,
            )
            if pass_through_to:
                now = utcnow()
                session.add_all(
                    Delivery(
                        job_id=job.id,
                        destination=destination,
                        kind="original",
                        attempts=0,
                        status=DeliveryStatus.pending,
                        next_attempt_at=now,
                    )
                    for destination in pass_through_to
                )
                sent_to = ", ".join(pass_through_to)
                self._event(session, job.id, "passed-through", f"not restored; sent unchanged to {sent_to}")
                session.flush()
                self._finish_if_delivered(session, job, now)
            return job.id

    # --- processing ------------------------------------------------------------------------

    def claim_job(self, worker: str, lease_s: float, now: datetime | None = None) -> JobSnapshot | None:
        """Take the oldest due job ('received', past any retry delay), counting an attempt.

        Jobs whose lease ran out are first given back (`_expire_leases`): a job is never claimed
        past `max_attempts`, so an image that kills its worker cannot loop.
        """
        now = now or utcnow()
        due = and_(Job.status == JobStatus.received, or_(Job.next_attempt_at.is_(None), Job.next_attempt_at <= now))
        with self._transaction() as session:
            self._expire_leases(session, now)
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
            self._event(
                session, job.id, "claimed", f"attempt {job.attempts} of {self.max_attempts}", actor=worker, at=now
            )
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
        qc_flags: Sequence[dict[str, Any]] = (),
        hold: bool = False,
    ) -> bool:
        """Record the derived image and its QC, and queue one delivery per (destination, kind), due
        now — or, with `hold` (a flagged job of a profile that holds them), held until `release`.

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
            job.qc_flags = list(qc_flags) or None
            job.timings = {**(job.timings or {}), **timings}
            job.device = device
            job.model_digest = model_digest
            job.model_name = model_name  # the model a restorer used (resolved when the profile named none)
            job.lease_owner = job.lease_expires_at = None
            hold = hold and bool(qc_flags) and bool(deliveries)
            job.status = JobStatus.held if hold else JobStatus.forwarding
            session.add_all(
                Delivery(
                    job_id=job_id,
                    destination=destination,
                    kind=kind,
                    attempts=0,
                    status=DeliveryStatus.held if hold else DeliveryStatus.pending,
                    next_attempt_at=now,
                )
                for destination, kind in deliveries
            )
            session.flush()
            sends = ", ".join(f"{kind} to {destination}" for destination, kind in deliveries) or "none"
            restore_s = timings.get("total")
            took = f" in {restore_s:.1f} s" if restore_s is not None else ""
            queued = "held until released" if hold else "queued"
            self._event(
                session, job_id, "restored", f"restored{took} on {device}; sends {queued}: {sends}", actor=worker
            )
            if qc_flags:
                self._event(session, job_id, "qc-flagged", "; ".join(str(f["message"]) for f in qc_flags), actor=worker)
            if not hold:
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
            when = "failed" if retry_at is None else f"retry at {retry_at.isoformat(timespec='seconds')}"
            self._event(session, job_id, "attempt-failed", f"{error}; {when}", actor=worker)
            return True

    def hand_back(self, owner: str, reason: str, *, counts: bool = True, prefix: bool = False) -> list[int]:
        """Give back the jobs a worker holds (`owner`, or every owner starting with it when
        `prefix`): due again now, or failed once they have had `max_attempts` when the attempt
        `counts` (the worker died on the job); a stop that was not the job's fault does not count.
        Returns the ids of the jobs given back or failed."""
        now = utcnow()
        held = Job.lease_owner.startswith(owner, autoescape=True) if prefix else Job.lease_owner == owner
        with self._transaction() as session:
            jobs = session.scalars(select(Job).where(Job.status == JobStatus.processing, held)).all()
            for job in jobs:
                if not counts:
                    job.attempts -= 1
                self._give_back(session, job, reason, now)
            return [job.id for job in jobs]

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
            self._event(
                session,
                delivery.job_id,
                "sent",
                f"{delivery.kind} acknowledged (status 0x{status:04X}) in {send_s:.1f} s, attempt {delivery.attempts}",
                destination=delivery.destination,
            )
            job = self._job(session, delivery.job_id)
            self._audit_send(session, job, delivery, AuditOutcome.success, status=status)
            self._finish_if_delivered(session, job, now)

    def expect_commitment(self, delivery_id: int, transaction_uid: str) -> None:
        """Name the storage commitment transaction of a send about to go, before it goes: PACS may
        report on it before the sender has recorded that the store succeeded."""
        with self._transaction() as session:
            self._delivery(session, delivery_id).commitment_uid = transaction_uid

    def delivery_stored(
        self, delivery_id: int, *, transaction_uid: str, status: int, send_s: float, commit_by: datetime
    ) -> bool:
        """Record a store PACS acknowledged and was asked to commit: 'committing' until its report
        or `commit_by`. False (nothing changed) when PACS reported on the transaction already."""
        with self._transaction() as session:
            delivery = self._delivery(session, delivery_id)
            if delivery.status != DeliveryStatus.sending or delivery.commitment_uid != transaction_uid:
                return False
            delivery.status = DeliveryStatus.committing
            delivery.last_status = status
            delivery.send_s = send_s
            delivery.commit_by = commit_by
            delivery.lease_owner = delivery.lease_expires_at = None
            self._event(
                session,
                delivery.job_id,
                "stored",
                f"{delivery.kind} acknowledged (status 0x{status:04X}) in {send_s:.1f} s, attempt {delivery.attempts}; "
                f"storage commitment asked (transaction {transaction_uid}), due by {_at(commit_by)}",
                destination=delivery.destination,
            )
            job = self._job(session, delivery.job_id)
            self._audit_send(session, job, delivery, AuditOutcome.success, status=status, commitment=transaction_uid)
            return True

    def find_commitment(self, transaction_uid: str) -> DeliverySnapshot | None:
        """The send waiting for this storage commitment transaction (None: unknown, or settled)."""
        with self._read() as session:
            delivery = session.scalar(
                select(Delivery).where(
                    Delivery.commitment_uid == transaction_uid,
                    Delivery.status.in_([DeliveryStatus.sending, DeliveryStatus.committing]),
                )
            )
            return DeliverySnapshot.of(delivery) if delivery else None

    def delivery_committed(self, delivery_id: int) -> None:
        """PACS committed to keep the image: the send is done, and the job once every send is."""
        now = utcnow()
        with self._transaction() as session:
            delivery = self._delivery(session, delivery_id)
            delivery.status = DeliveryStatus.sent
            delivery.sent_at = now
            delivery.commit_by = delivery.lease_owner = delivery.lease_expires_at = None
            self._event(
                session,
                delivery.job_id,
                "committed",
                f"{delivery.kind}: storage commitment confirmed (transaction {delivery.commitment_uid})",
                destination=delivery.destination,
            )
            self._finish_if_delivered(session, self._job(session, delivery.job_id), now)

    def overdue_commitments(self, now: datetime | None = None) -> list[DeliverySnapshot]:
        """Sends whose storage commitment report did not come in time."""
        now = now or utcnow()
        with self._read() as session:
            rows = session.scalars(
                select(Delivery).where(Delivery.status == DeliveryStatus.committing, Delivery.commit_by < now)
            )
            return [DeliverySnapshot.of(row) for row in rows]

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
            delivery.lease_owner = delivery.lease_expires_at = delivery.commit_by = None
            delivery.next_attempt_at = retry_at
            delivery.status = DeliveryStatus.failed if retry_at is None else DeliveryStatus.pending
            when = "gave up" if retry_at is None else f"retry at {retry_at.isoformat(timespec='seconds')}"
            code = "" if status is None else f" (status 0x{status:04X})"
            self._event(
                session,
                delivery.job_id,
                "send-failed",
                f"{delivery.kind}, attempt {delivery.attempts}: {error}{code}; {when}",
                destination=delivery.destination,
            )
            job = self._job(session, delivery.job_id)
            outcome = AuditOutcome.minor_failure if retry_at else AuditOutcome.serious_failure
            self._audit_send(session, job, delivery, outcome, status=status, error=error)
            if retry_at is None and job.status == JobStatus.forwarding:
                job.status = JobStatus.failed
                job.last_error = f"{delivery.destination}: {error}"

    # --- recovery and IT commands ------------------------------------------------------------

    def reclaim_expired(self, now: datetime | None = None) -> int:
        """Give back rows whose lease ran out (their worker died): jobs as `_expire_leases` does,
        sends to pending, due now; returns how many."""
        now = now or utcnow()
        with self._transaction() as session:
            jobs = self._expire_leases(session, now)
            deliveries = cast(
                CursorResult[Any],
                session.execute(
                    update(Delivery)
                    .where(Delivery.status == DeliveryStatus.sending, Delivery.lease_expires_at < now)
                    .values(status=DeliveryStatus.pending, lease_owner=None, lease_expires_at=None, next_attempt_at=now)
                ),
            )
            return jobs + deliveries.rowcount

    def retry(self, job_id: int, actor: str = "cli") -> Change:
        """Make a job's next step happen now.

        A failed or cancelled job is queued again (without a derived image it is processed
        again; with one, its failed or cancelled sends go again, attempts reset so the backoff
        starts afresh); a job waiting for an automatic retry (of its processing or of a send) is
        due now. Nothing changes for a job that is due already, processing or done.
        Raises InputRefused for an unknown job.
        """
        now = utcnow()
        with self._transaction() as session:
            job = self._job(session, job_id)
            if job.status in (JobStatus.processing, JobStatus.done):
                return Change(False, f"job {job_id} is {job.status}: nothing to retry")
            if job.status == JobStatus.received:
                if job.next_attempt_at is None or job.next_attempt_at <= now:
                    return Change(False, f"job {job_id} is already queued and due: nothing changed")
                waited = job.next_attempt_at
                job.next_attempt_at = now
                return self._changed(
                    session, job_id, "retry", actor, f"processing is due now (was due at {_at(waited)})"
                )
            if job.status == JobStatus.held:
                return Change(False, f"job {job_id} is held for QC review: release it or cancel it")
            if job.status == JobStatus.forwarding:
                waiting = session.scalars(
                    select(Delivery).where(
                        Delivery.job_id == job_id,
                        Delivery.status == DeliveryStatus.pending,
                        Delivery.next_attempt_at > now,
                    )
                ).all()
                if not waiting:
                    return Change(False, f"job {job_id} has no send waiting for a retry: nothing changed")
                for delivery in waiting:
                    delivery.next_attempt_at = now
                sends = ", ".join(f"{d.kind} to {d.destination}" for d in waiting)
                return self._changed(session, job_id, "retry", actor, f"sends due now: {sends}")
            job.last_error = None
            if job.derived_path is None:
                job.status = JobStatus.received
                job.next_attempt_at = None
                job.attempts = 0
                return self._changed(session, job_id, "retry", actor, "queued for processing again")
            again = session.scalars(
                select(Delivery).where(
                    Delivery.job_id == job_id, Delivery.status.in_([DeliveryStatus.failed, DeliveryStatus.cancelled])
                )
            ).all()
            for delivery in again:
                delivery.status, delivery.next_attempt_at, delivery.attempts = DeliveryStatus.pending, now, 0
            job.status = JobStatus.forwarding
            sends = ", ".join(f"{d.kind} to {d.destination}" for d in again) or "none left"
            change = self._changed(session, job_id, "retry", actor, f"sends queued again: {sends}")
            self._finish_if_delivered(session, job, now)
            return change

    def cancel(self, job_id: int, actor: str = "cli") -> Change:
        """Stop a job and its pending sends. A worker holding it loses the lease (its heartbeat
        returns False); a send in flight finishes but is not retried. Nothing changes for a job
        that is cancelled or done already. Raises InputRefused for an unknown job."""
        with self._transaction() as session:
            job = self._job(session, job_id)
            if job.status in (JobStatus.cancelled, JobStatus.done):
                return Change(False, f"job {job_id} is {job.status} already: nothing to cancel")
            before = job.status
            job.status = JobStatus.cancelled
            job.lease_owner = job.lease_expires_at = None
            stopped = cast(
                CursorResult[Any],
                session.execute(
                    update(Delivery)
                    .where(
                        Delivery.job_id == job_id, Delivery.status.in_([DeliveryStatus.pending, DeliveryStatus.held])
                    )
                    .values(status=DeliveryStatus.cancelled)
                ),
            ).rowcount
            return self._changed(
                session, job_id, "cancel", actor, f"cancelled (was {before}; {stopped} pending sends stopped)"
            )

    def resend(self, job_id: int, destinations: Sequence[str] | None = None, actor: str = "cli") -> Change:
        """Send a job's derived image again: to `destinations`, or to every destination it was
        sent to. For a PACS that lost it; the derived UID is the same, so it replaces, never
        duplicates. Raises InputRefused for an unknown job, one without a derived image, or one
        that is processing."""
        now = utcnow()
        with self._transaction() as session:
            job = self._job(session, job_id)
            if job.derived_path is None:
                raise InputRefused(f"job {job_id} has no derived image to send (it is {job.status}); try reprocess")
            if job.status == JobStatus.processing:
                raise InputRefused(f"job {job_id} is processing; wait for it to finish")
            previous = session.scalars(
                select(Delivery.destination).where(Delivery.job_id == job_id, Delivery.kind == "derived").distinct()
            ).all()
            targets = list(dict.fromkeys(destinations or previous))
            if not targets:
                return Change(False, f"job {job_id} was never sent anywhere: name a destination with --to")
            session.add_all(
                Delivery(
                    job_id=job_id,
                    destination=destination,
                    kind="derived",
                    attempts=0,
                    status=DeliveryStatus.pending,
                    next_attempt_at=now,
                )
                for destination in targets
            )
            job.status = JobStatus.forwarding
            job.completed_at = None
            return self._changed(session, job_id, "resend", actor, f"derived image queued to {', '.join(targets)}")

    def release(self, job_id: int, actor: str = "cli") -> Change:
        """Send a held job (QC-flagged, its profile holds flagged images) to its destinations after
        all: a person looked at it and accepts it. Raises InputRefused for an unknown job."""
        now = utcnow()
        with self._transaction() as session:
            job = self._job(session, job_id)
            if job.status != JobStatus.held:
                return Change(False, f"job {job_id} is {job.status}, not held: nothing to release")
            released = cast(
                CursorResult[Any],
                session.execute(
                    update(Delivery)
                    .where(Delivery.job_id == job_id, Delivery.status == DeliveryStatus.held)
                    .values(status=DeliveryStatus.pending, next_attempt_at=now)
                ),
            ).rowcount
            job.status = JobStatus.forwarding
            self._finish_if_delivered(session, job, now)
            return self._changed(session, job_id, "release", actor, f"released: {released} held sends queued")

    def reprocess(self, job_id: int, actor: str = "cli") -> Change:
        """Restore a job again from its spooled input (after a new model or a corrected calibration):
        queued now, attempts from zero, unsent sends of the old result cancelled. Raises
        InputRefused for an unknown job or one that is processing."""
        with self._transaction() as session:
            job = self._job(session, job_id)
            if job.status == JobStatus.processing:
                raise InputRefused(f"job {job_id} is processing; wait for it to finish")
            before = job.status
            session.execute(
                update(Delivery)
                .where(
                    Delivery.job_id == job_id,
                    Delivery.status.in_([DeliveryStatus.pending, DeliveryStatus.failed, DeliveryStatus.held]),
                )
                .values(status=DeliveryStatus.cancelled)
            )
            job.status = JobStatus.received
            job.next_attempt_at = job.completed_at = job.last_error = None
            job.attempts = 0
            return self._changed(session, job_id, "reprocess", actor, f"queued for processing again (was {before})")

    # --- audit trail ---------------------------------------------------------------------------

    def audit(
        self,
        event: str,
        *,
        actor: str,
        outcome: AuditOutcome = AuditOutcome.success,
        address: str | None = None,
        **detail: Any,
    ) -> None:
        """Record an event that belongs to no job change (associations, configuration loaded)."""
        with self._transaction() as session:
            self._audit(session, event, actor=actor, outcome=outcome, address=address, **detail)

    def audit_events(
        self, *, since: datetime | None = None, event: str | None = None, limit: int | None = None
    ) -> list[AuditSnapshot]:
        """The audit trail, newest first."""
        query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
        if since is not None:
            query = query.where(AuditEvent.at >= since)
        if event is not None:
            query = query.where(AuditEvent.event == event)
        with self._read() as session:
            return [AuditSnapshot.of(row) for row in session.scalars(query)]

    def ship_audit(self, send: Callable[[Sequence[AuditSnapshot]], None], batch: int = 100) -> int:
        """Hand the oldest unshipped audit lines to `send` (the syslog client) and mark them shipped.

        The rows stay locked while `send` runs, so two nodes sharing the job log never ship the same
        line; if `send` raises, nothing is marked and the next call tries the same lines again.
        """
        with self._transaction() as session:
            rows = session.scalars(
                select(AuditEvent)
                .where(AuditEvent.shipped_at.is_(None))
                .order_by(AuditEvent.id)
                .limit(batch)
                .with_for_update(skip_locked=True)
            ).all()
            if rows:
                send([AuditSnapshot.of(row) for row in rows])
                now = utcnow()
                for row in rows:
                    row.shipped_at = now
            return len(rows)

    def events(self, job_id: int) -> list[JobEventSnapshot]:
        """A job's history, oldest first."""
        with self._read() as session:
            rows = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id))
            return [JobEventSnapshot.of(row) for row in rows]

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
        self, where: JobFilter | None = None, *, limit: int | None = 100, offset: int = 0, **criteria: Any
    ) -> list[JobSnapshot]:
        """The newest jobs first that pass `where` (or a JobFilter of `criteria`: status=, since=, …).

        At most `limit` jobs after skipping `offset`; limit None: all of them.
        """
        where = where or JobFilter(**criteria)
        query = where.apply(select(Job)).order_by(Job.id.desc()).limit(limit).offset(offset)
        with self._read() as session:
            return [JobSnapshot.of(job) for job in session.scalars(query)]

    def count_jobs(self, where: JobFilter | None = None) -> int:
        with self._read() as session:
            return int(session.scalar((where or JobFilter()).apply(select(func.count(Job.id)))) or 0)

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A read-only session for reports and dashboards that aggregate over the tables; change
        nothing through it (state changes go through this class's methods)."""
        with self._read() as session:
            yield session

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

    def _expire_leases(self, session: Session, now: datetime) -> int:
        """Jobs whose lease ran out (their worker stopped renewing it): given back (`_give_back`)."""
        expired = session.scalars(
            select(Job).where(Job.status == JobStatus.processing, Job.lease_expires_at < now)
        ).all()
        for job in expired:
            self._give_back(session, job, f"worker {job.lease_owner} stopped renewing its lease", now)
        return len(expired)

    def _give_back(self, session: Session, job: Job, reason: str, now: datetime) -> None:
        """A job taken from its worker: due again now, or failed when it has had `max_attempts`."""
        owner = job.lease_owner
        job.lease_owner = job.lease_expires_at = None
        if job.attempts >= self.max_attempts:
            job.status = JobStatus.failed
            job.last_error = f"{reason} on {job.attempts} attempts"
            self._event(session, job.id, "failed", job.last_error, actor=owner, at=now)
            return
        job.status = JobStatus.received
        job.next_attempt_at = now
        job.last_error = reason
        self._event(session, job.id, "handed-back", f"{reason}; due again now", actor=owner, at=now)

    @staticmethod
    def _event(
        session: Session,
        job_id: int,
        kind: str,
        detail: str | None = None,
        *,
        destination: str | None = None,
        actor: str | None = None,
        at: datetime | None = None,
    ) -> None:
        session.add(
            JobEvent(job_id=job_id, at=at or utcnow(), kind=kind, detail=detail, destination=destination, actor=actor)
        )

    @staticmethod
    def _audit(
        session: Session,
        event: str,
        *,
        actor: str,
        outcome: AuditOutcome = AuditOutcome.success,
        address: str | None = None,
        job_id: int | None = None,
        **detail: Any,
    ) -> None:
        session.add(
            AuditEvent(
                at=utcnow(),
                event=event,
                outcome=int(outcome),
                actor=actor,
                address=address,
                job_id=job_id,
                detail={key: value for key, value in detail.items() if value is not None},
            )
        )

    def _audit_send(self, session: Session, job: Job, delivery: Delivery, outcome: AuditOutcome, **detail: Any) -> None:
        """An instance-sent line: which image (the derived one, or the original passed through) went where."""
        derived = delivery.kind == "derived"
        received = session.scalar(
            select(AuditEvent.detail).where(AuditEvent.job_id == job.id, AuditEvent.event == "instance-received")
        )
        self._audit(
            session,
            "instance-sent",
            actor="forwarder",
            outcome=outcome,
            job_id=job.id,
            destination=delivery.destination,
            kind=delivery.kind,
            attempt=delivery.attempts,
            sop_class_uid=job.sop_class_uid,  # a derived instance keeps its source's SOP class
            sop_instance_uid=job.derived_sop_instance_uid if derived else job.sop_instance_uid,
            study_instance_uid=job.study_instance_uid,
            patient_id=(received or {}).get("patient_id"),
            **detail,
        )

    def _changed(self, session: Session, job_id: int, action: str, actor: str, what: str) -> Change:
        """Record a command's change in the job's history and the audit trail, and say it."""
        self._event(session, job_id, action, what, actor=actor)
        self._audit(session, _COMMAND_AUDIT[action], actor=actor, job_id=job_id, change=what)
        return Change(True, f"job {job_id}: {what}")

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

    # --- phantom QA sessions -------------------------------------------------------------------

    def mark_phantom_image(self, job_id: int, rule: str, quiet_minutes: float, at: datetime | None = None) -> int:
        """Record that a job's image matched phantom QA `rule` and put it into a QA session; returns
        the session's id.

        A session holds the images of one rule and one detector with no gap longer than
        `quiet_minutes`: the image joins the open session whose span it falls within (that much
        before its first image or after its last), else it opens a new one. The image's time is
        `at`, by default when the job was received (when the modality sent it, whatever the queue's
        backlog). Marking a job twice changes nothing: a reprocessed image stays in its session.
        """
        quiet = timedelta(minutes=quiet_minutes)
        with self._transaction() as session:
            job = self._job(session, job_id)
            if job.qa_session_id is not None:
                return job.qa_session_id
            at = at or job.received_at
            same_detector = (
                QaSession.detector_serial.is_(None)
                if job.detector_serial is None
                else QaSession.detector_serial == job.detector_serial
            )
            row = session.scalars(
                select(QaSession)
                .where(
                    QaSession.rule == rule,
                    same_detector,
                    QaSession.status == QaSessionStatus.open,
                    QaSession.first_image_at <= at + quiet,
                    QaSession.last_image_at >= at - quiet,
                )
                .order_by(QaSession.last_image_at.desc())
                .limit(1)
                .with_for_update()
            ).first()
            if row is None:
                row = QaSession(
                    rule=rule,
                    detector_serial=job.detector_serial,
                    station_name=job.station_name,
                    first_image_at=at,
                    last_image_at=at,
                    status=QaSessionStatus.open,
                    attempts=0,
                )
                session.add(row)
                session.flush()
            else:
                row.first_image_at = min(row.first_image_at, at)
                row.last_image_at = max(row.last_image_at, at)
            job.qa_rule = rule
            job.qa_session_id = row.id
            self._event(session, job_id, "phantom-qa", f"phantom QA rule {rule!r}: QA session {row.id}")
            return row.id

    def claim_qa_session(
        self,
        owner: str,
        lease_s: float,
        quiet_minutes: Mapping[str, float],
        now: datetime | None = None,
    ) -> QaSessionSnapshot | None:
        """Take the QA session due first for evaluation, counting an attempt.

        A session is due when it is open and its last image is more than its rule's quiet period
        old (`quiet_minutes`: rule name → minutes, from the configuration; sessions of a rule not
        given are left alone), and no image received before that period ended is still waiting to
        be decoded (it may be one of the session's, not yet matched). Sessions whose evaluator
        stopped renewing its lease are first given back, or failed once they had `max_attempts`.
        """
        now = now or utcnow()
        with self._transaction() as session:
            self._expire_qa_leases(session, now)
            if not quiet_minutes:
                return None
            undecoded = session.scalar(
                select(func.min(Job.received_at)).where(
                    Job.status.in_([JobStatus.received, JobStatus.processing]), Job.decoded_at.is_(None)
                )
            )
            horizon = now if undecoded is None else min(now, undecoded)
            quiet_over = or_(
                *(
                    and_(QaSession.rule == rule, QaSession.last_image_at < horizon - timedelta(minutes=minutes))
                    for rule, minutes in quiet_minutes.items()
                )
            )
            row = session.scalars(
                select(QaSession)
                .where(QaSession.status == QaSessionStatus.open, quiet_over)
                .order_by(QaSession.last_image_at, QaSession.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if row is None:
                return None
            row.status = QaSessionStatus.evaluating
            row.lease_owner = owner
            row.lease_expires_at = now + timedelta(seconds=lease_s)
            row.attempts += 1
            return QaSessionSnapshot.of(row)

    def renew_qa_session(self, session_id: int, owner: str, lease_s: float) -> bool:
        """Extend an evaluation's lease; False means the evaluator lost the session: stop evaluating it."""
        with self._transaction() as session:
            result = cast(
                CursorResult[Any],
                session.execute(
                    update(QaSession)
                    .where(
                        QaSession.id == session_id,
                        QaSession.status == QaSessionStatus.evaluating,
                        QaSession.lease_owner == owner,
                    )
                    .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s))
                ),
            )
            return result.rowcount == 1

    def qa_session_evaluated(self, session_id: int, owner: str, result: dict[str, Any]) -> bool:
        """Store a session's figures (strict-JSON-able); False (nothing changed) without the lease."""
        with self._transaction() as session:
            row = self._leased_qa_session(session, session_id, owner)
            if row is None:
                return False
            row.status = QaSessionStatus.evaluated
            row.result = result
            row.error = None
            row.evaluated_at = utcnow()
            row.lease_owner = row.lease_expires_at = None
            return True

    def qa_session_failed(self, session_id: int, owner: str, error: str, *, retry: bool = False) -> bool:
        """Record why a session could not be evaluated: failed for good, or (`retry`, for an internal
        error below the attempts cap) open again and due at once. False without the lease."""
        with self._transaction() as session:
            row = self._leased_qa_session(session, session_id, owner)
            if row is None:
                return False
            row.error = error
            row.lease_owner = row.lease_expires_at = None
            row.status = QaSessionStatus.open if retry else QaSessionStatus.failed
            row.evaluated_at = None if retry else utcnow()
            return True

    def qa_session_released(self, session_id: int, owner: str) -> bool:
        """Give a session back unevaluated, the attempt not counted (its evaluator stepped aside for
        clinical images); due again at once. False without the lease."""
        with self._transaction() as session:
            row = self._leased_qa_session(session, session_id, owner)
            if row is None:
                return False
            row.status = QaSessionStatus.open
            row.attempts -= 1
            row.lease_owner = row.lease_expires_at = None
            return True

    def get_qa_session(self, session_id: int) -> QaSessionSnapshot | None:
        with self._read() as session:
            row = session.get(QaSession, session_id)
            return None if row is None else QaSessionSnapshot.of(row)

    def qa_sessions(
        self,
        *,
        detector: str | None = None,
        rule: str | None = None,
        status: QaSessionStatus | str | None = None,
        limit: int | None = 100,
    ) -> list[QaSessionSnapshot]:
        """The newest QA sessions first (by their first image), of one detector, rule or status if given."""
        query = select(QaSession)
        if detector is not None:
            query = query.where(QaSession.detector_serial == detector)
        if rule is not None:
            query = query.where(QaSession.rule == rule)
        if status is not None:
            query = query.where(QaSession.status == QaSessionStatus(status))
        query = query.order_by(QaSession.first_image_at.desc(), QaSession.id.desc()).limit(limit)
        with self._read() as session:
            return [QaSessionSnapshot.of(row) for row in session.scalars(query)]

    def qa_session_jobs(self, session_id: int) -> list[JobSnapshot]:
        """The jobs (images) of a QA session, oldest first."""
        with self._read() as session:
            jobs = session.scalars(select(Job).where(Job.qa_session_id == session_id).order_by(Job.id))
            return [JobSnapshot.of(job) for job in jobs]

    def jobs_due(self, now: datetime | None = None) -> int:
        """How many jobs a worker could claim now: a QA evaluation steps aside while there are any."""
        now = now or utcnow()
        due = and_(Job.status == JobStatus.received, or_(Job.next_attempt_at.is_(None), Job.next_attempt_at <= now))
        with self._read() as session:
            return int(session.scalar(select(func.count(Job.id)).where(due)) or 0)

    @staticmethod
    def _leased_qa_session(session: Session, session_id: int, owner: str) -> QaSession | None:
        row = session.get(QaSession, session_id)
        if row is None:
            raise InputRefused(f"no QA session {session_id}")
        if row.status != QaSessionStatus.evaluating or row.lease_owner != owner:
            return None
        return row

    def _expire_qa_leases(self, session: Session, now: datetime) -> None:
        """Sessions whose evaluator stopped renewing its lease: open again, or failed at `max_attempts`."""
        expired = session.scalars(
            select(QaSession).where(QaSession.status == QaSessionStatus.evaluating, QaSession.lease_expires_at < now)
        ).all()
        for row in expired:
            reason = f"evaluator {row.lease_owner} stopped renewing its lease"
            row.lease_owner = row.lease_expires_at = None
            if row.attempts >= self.max_attempts:
                row.status = QaSessionStatus.failed
                row.error = f"{reason} on {row.attempts} attempts"
                row.evaluated_at = now
            else:
                row.status = QaSessionStatus.open
                row.error = reason


def _at(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")
