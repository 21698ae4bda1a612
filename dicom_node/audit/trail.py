"""What the node itself writes to the audit trail, besides the job log's own lines."""

from __future__ import annotations

import getpass
import os

from dicom_node.config import Config
from dicom_node.joblog import JobLog


def record_config_loaded(config: Config, joblog: JobLog, by: str) -> None:
    """`by` (e.g. "serve") runs with this configuration: its file and SHA-256, for the trail."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid {os.getuid()}"
    joblog.audit(
        "config-loaded",
        actor=f"{by} {user}",
        file=str(config.path) if config.path else "embedded defaults",
        sha256=config.digest,
        pid=os.getpid(),
    )
