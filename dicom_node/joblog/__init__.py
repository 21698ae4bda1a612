"""The job log: the single source of truth for every received image and its deliveries."""

from .tables import DeliverySnapshot, DeliveryStatus, JobSnapshot, JobStatus
from .jobs import JobLog

__all__ = ["DeliverySnapshot", "DeliveryStatus", "JobLog", "JobSnapshot", "JobStatus"]
