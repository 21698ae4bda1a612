"""Receiving images from modalities: the Storage SCP, its spool and its calling-AE allow-list."""

from dicom_node.receive.allowlist import AllowList, Refused, Rejection
from dicom_node.receive.scp import StorageSCP
from dicom_node.receive.spool import Spool

__all__ = ["AllowList", "Refused", "Rejection", "Spool", "StorageSCP"]
