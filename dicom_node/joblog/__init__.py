"""The job log: the single source of truth for every received image, its deliveries and its history."""

from .jobs import Change, JobLog
from .tables import DeliverySnapshot, DeliveryStatus, JobEventSnapshot, JobSnapshot, JobStatus

__all__ = ["Change", "DeliverySnapshot", "DeliveryStatus", "JobEventSnapshot", "JobLog", "JobSnapshot", "JobStatus"]
