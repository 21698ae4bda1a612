"""The job log: the single source of truth for every received image and its deliveries."""

from .models import DeliverySnapshot, DeliveryStatus, JobSnapshot, JobStatus
from .queue import JobLog

__all__ = ["DeliverySnapshot", "DeliveryStatus", "JobLog", "JobSnapshot", "JobStatus"]
