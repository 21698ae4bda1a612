"""The job log: the single source of truth for every received image, its deliveries and its history."""

from .jobs import Change, JobFilter, JobLog
from .tables import (
    AuditOutcome,
    AuditSnapshot,
    DeliverySnapshot,
    DeliveryStatus,
    JobEventSnapshot,
    JobSnapshot,
    JobStatus,
    QaSessionSnapshot,
    QaSessionStatus,
)

__all__ = [
    "AuditOutcome",
    "AuditSnapshot",
    "Change",
    "DeliverySnapshot",
    "DeliveryStatus",
    "JobEventSnapshot",
    "JobFilter",
    "JobLog",
    "JobSnapshot",
    "JobStatus",
    "QaSessionSnapshot",
    "QaSessionStatus",
]
