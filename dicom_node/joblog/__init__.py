"""The job log: the single source of truth for every received image and its deliveries."""

from .jobs import JobLog
from .tables import DeliverySnapshot, DeliveryStatus, JobSnapshot, JobStatus

__all__ = ["DeliverySnapshot", "DeliveryStatus", "JobLog", "JobSnapshot", "JobStatus"]
