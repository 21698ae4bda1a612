"""Tables of the job log and the frozen snapshots handed out of it.

A job is one received image on its way to PACS; a delivery is one send of it (derived or
original) to one destination; an event is one line of a job's history (received, claimed,
restored, each send attempt, each command that changed it). Rows change state only through
`jobs.JobLog`; everything else gets snapshots, so no caller holds a live session or can change a
row by accident.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import UTC, datetime
from enum import IntEnum, StrEnum
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Enum, ForeignKey, Index, String, Text
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class JobStatus(StrEnum):
    received = "received"
    processing = "processing"
    forwarding = "forwarding"
    held = "held"  # restored, QC-flagged, and its profile holds flagged images until released
    done = "done"
    failed = "failed"
    cancelled = "cancelled"


class DeliveryStatus(StrEnum):
    held = "held"  # waits for its job's release (a QC-flagged job of a profile with hold_flagged)
    pending = "pending"
    sending = "sending"
    committing = "committing"  # stored; waits for the destination's storage commitment (N-EVENT-REPORT)
    sent = "sent"
    failed = "failed"
    cancelled = "cancelled"


DELIVERY_KINDS = ("derived", "original")


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in Python on every backend.

    PostgreSQL keeps the zone (timestamptz); SQLite has none, so it stores naive UTC, which also
    keeps its text timestamps comparable. Naive input is refused: its zone would be a guess.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware one")
        value = value.astimezone(UTC)
        return value if dialect.name == "postgresql" else value.replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _status_type(enum: type[StrEnum], name: str) -> Enum:
    """Plain VARCHAR of the values: new states need no ALTER TYPE on PostgreSQL."""
    return Enum(
        enum,
        name=name,
        native_enum=False,
        length=16,
        values_callable=lambda members: [member.value for member in members],
    )


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_claim", "status", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    calling_ae: Mapped[str] = mapped_column(String(16))
    called_ae: Mapped[str] = mapped_column(String(16))
    peer_host: Mapped[str | None] = mapped_column(String(255))
    station_name: Mapped[str | None] = mapped_column(String(255))
    detector_serial: Mapped[str | None] = mapped_column(String(255))
    profile: Mapped[str] = mapped_column(String(255))
    # The restoration plan, decided from the profile when a worker claims the job (revision 0002).
    pipeline: Mapped[str | None] = mapped_column(String(64))
    restorer_options: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    dose_fraction: Mapped[float | None]
    model_name: Mapped[str | None] = mapped_column(String(255))
    model_digest: Mapped[str | None] = mapped_column(String(128))
    input_path: Mapped[str] = mapped_column(Text)
    input_sha256: Mapped[str] = mapped_column(String(64))
    input_bytes: Mapped[int] = mapped_column(BigInteger)
    derived_path: Mapped[str | None] = mapped_column(Text)
    derived_sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[JobStatus] = mapped_column(_status_type(JobStatus, "job_status"))
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    decoded_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    restored_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    derived_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    decode_s: Mapped[float | None]
    restore_s: Mapped[float | None]
    derive_s: Mapped[float | None]
    timings: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    device: Mapped[str | None] = mapped_column(String(64))
    qc: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # QC figures outside their thresholds, [{figure, value, min, max, message}] (revision 0004); [] none
    qc_flags: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON(none_as_null=True))
    qa_rule: Mapped[str | None] = mapped_column(String(64))  # the phantom QA rule the image matched
    qa_session_id: Mapped[int | None] = mapped_column(index=True)  # its QA session, once grouped


class Delivery(Base):
    __tablename__ = "deliveries"
    __table_args__ = (Index("ix_deliveries_claim", "status", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[DeliveryStatus] = mapped_column(_status_type(DeliveryStatus, "delivery_status"))
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_status: Mapped[int | None]
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    send_s: Mapped[float | None]
    commitment_uid: Mapped[str | None] = mapped_column(String(64), index=True)  # Transaction UID asked
    commit_by: Mapped[datetime | None] = mapped_column(UTCDateTime)  # no report by then: failed, retried


class JobEvent(Base):
    """One line of a job's history, written in the same transaction as the change it records."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    kind: Mapped[str] = mapped_column(String(32))  # received, claimed, restored, sent, send-failed, …
    destination: Mapped[str | None] = mapped_column(String(255))
    detail: Mapped[str | None] = mapped_column(Text)
    actor: Mapped[str | None] = mapped_column(String(255))  # the worker, or "command retry", …


class AuditOutcome(IntEnum):
    """DICOM PS3.15 A.5.1 EventOutcomeIndicator: how a security-relevant event ended."""

    success = 0
    minor_failure = 4  # e.g. a send that will be retried
    serious_failure = 8  # e.g. an association rejected, a send given up
    major_failure = 12


class AuditEvent(Base):
    """One line of the audit trail (revision 0005): who did what, from where, with what outcome.

    Not tied to a job by a foreign key: the trail outlives the jobs that retention deletes.
    `shipped_at` is set once the syslog collector has it (none configured: stays empty).
    """

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_unshipped", "shipped_at", "id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    event: Mapped[str] = mapped_column(String(32))  # association-accepted, instance-received, job-retried, …
    outcome: Mapped[int]  # AuditOutcome
    actor: Mapped[str] = mapped_column(String(255))  # calling AE title, "cli alice", "dashboard bob", the node
    address: Mapped[str | None] = mapped_column(String(255))  # the peer's IP address
    job_id: Mapped[int | None] = mapped_column(index=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)  # UIDs, destination, status, reason, digest, …
    shipped_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class QaSessionStatus(StrEnum):
    open = "open"  # images still arriving (the last less than the rule's quiet_minutes ago)
    evaluating = "evaluating"  # leased by an evaluator
    evaluated = "evaluated"
    failed = "failed"  # evaluation impossible; `error` says why


class QaSession(Base):
    """One phantom QA session: the images of one rule and detector taken together (revision 0004)."""

    __tablename__ = "qa_sessions"

    id: Mapped[int] = mapped_column(primary_key=True)
    rule: Mapped[str] = mapped_column(String(64))
    detector_serial: Mapped[str | None] = mapped_column(String(255))
    station_name: Mapped[str | None] = mapped_column(String(255))
    first_image_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_image_at: Mapped[datetime] = mapped_column(UTCDateTime)
    status: Mapped[QaSessionStatus] = mapped_column(_status_type(QaSessionStatus, "qa_session_status"))
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(default=0)
    evaluated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)


@dataclass(frozen=True)
class JobSnapshot:
    """A job row as it was when read; safe to keep after the session is gone."""

    id: int
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    calling_ae: str
    called_ae: str
    peer_host: str | None
    station_name: str | None
    detector_serial: str | None
    profile: str
    pipeline: str | None
    restorer_options: dict[str, Any] | None
    dose_fraction: float | None
    model_name: str | None
    model_digest: str | None
    input_path: str
    input_sha256: str
    input_bytes: int
    derived_path: str | None
    derived_sop_instance_uid: str | None
    status: JobStatus
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    lease_owner: str | None
    lease_expires_at: datetime | None
    received_at: datetime
    claimed_at: datetime | None
    decoded_at: datetime | None
    restored_at: datetime | None
    derived_at: datetime | None
    completed_at: datetime | None
    decode_s: float | None
    restore_s: float | None
    derive_s: float | None
    timings: dict[str, Any] | None
    device: str | None
    qc: dict[str, Any] | None
    qc_flags: list[dict[str, Any]] | None
    qa_rule: str | None
    qa_session_id: int | None

    @classmethod
    def of(cls, job: Job) -> JobSnapshot:
        return cls(**{field.name: getattr(job, field.name) for field in fields(cls)})


@dataclass(frozen=True)
class DeliverySnapshot:
    """A delivery row as it was when read; safe to keep after the session is gone."""

    id: int
    job_id: int
    destination: str
    kind: str
    status: DeliveryStatus
    attempts: int
    next_attempt_at: datetime | None
    lease_owner: str | None
    lease_expires_at: datetime | None
    last_error: str | None
    last_status: int | None
    sent_at: datetime | None
    send_s: float | None
    commitment_uid: str | None
    commit_by: datetime | None

    @classmethod
    def of(cls, delivery: Delivery) -> DeliverySnapshot:
        return cls(**{field.name: getattr(delivery, field.name) for field in fields(cls)})


@dataclass(frozen=True)
class JobEventSnapshot:
    """An event row as it was when read."""

    id: int
    job_id: int
    at: datetime
    kind: str
    destination: str | None
    detail: str | None
    actor: str | None

    @classmethod
    def of(cls, event: JobEvent) -> JobEventSnapshot:
        return cls(**{field.name: getattr(event, field.name) for field in fields(cls)})


@dataclass(frozen=True)
class QaSessionSnapshot:
    """A QA session row as it was when read."""

    id: int
    rule: str
    detector_serial: str | None
    station_name: str | None
    first_image_at: datetime
    last_image_at: datetime
    status: QaSessionStatus
    lease_owner: str | None
    lease_expires_at: datetime | None
    attempts: int
    evaluated_at: datetime | None
    result: dict[str, Any] | None
    error: str | None

    @classmethod
    def of(cls, row: QaSession) -> QaSessionSnapshot:
        return cls(**{field.name: getattr(row, field.name) for field in fields(cls)})


@dataclass(frozen=True)
class AuditSnapshot:
    """An audit row as it was when read."""

    id: int
    at: datetime
    event: str
    outcome: int
    actor: str
    address: str | None
    job_id: int | None
    detail: dict[str, Any]
    shipped_at: datetime | None

    @classmethod
    def of(cls, row: AuditEvent) -> AuditSnapshot:
        return cls(**{field.name: getattr(row, field.name) for field in fields(cls)})
