"""One log format for every process of the node (stderr; systemd's journal keeps it)."""

import logging
import os


def configure_logging(level: str | None = None) -> None:
    logging.basicConfig(
        level=(level or os.environ.get("DICOM_NODE_LOG_LEVEL", "INFO")).upper(),
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
    )
    # pynetdicom narrates every PDU at INFO; its warnings and errors are what IT needs.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # APScheduler logs every run of the once-a-second dispatch job at INFO.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
