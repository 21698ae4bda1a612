"""The audit trail leaves the node: DICOM PS3.15 audit messages (as IHE ATNA and dcm4chee send
them) over RFC 5424 syslog to the site's collector. The trail itself lives in the job log."""

from .atna import audit_message
from .syslog import SyslogShipper
from .trail import record_config_loaded

__all__ = ["SyslogShipper", "audit_message", "record_config_loaded"]
