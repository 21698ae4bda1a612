"""Delivery of derived images: Storage SCU with a watchdog, and folder destinations."""

from dicom_node.forward.destinations import Destination, FolderDestination, NetworkDestination, make_destination
from dicom_node.forward.scu import SendResult, echo, send_file

__all__ = [
    "Destination",
    "FolderDestination",
    "NetworkDestination",
    "SendResult",
    "echo",
    "make_destination",
    "send_file",
]
