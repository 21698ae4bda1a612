"""RFC 5424 syslog of the audit trail to the site's collector: UDP (RFC 5426), TCP (RFC 6587
octet counting) or TLS (RFC 5425, the ATNA transport). Lines are shipped from the job log, so a
collector that is down loses nothing: they stay unshipped and go when it answers again."""

from __future__ import annotations

import logging
import os
import socket
import ssl
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from dicom_node.config import SyslogSettings
from dicom_node.joblog import AuditSnapshot, JobLog

from .atna import audit_message

log = logging.getLogger("dicom_node.audit")

FACILITY_AUTHPRIV = 10  # security/authorization messages, as ATNA asks
SEVERITY = {0: 5, 4: 4, 8: 4, 12: 3}  # outcome → notice, warning, warning, error
MSGID = "IHE+RFC-3881"  # IHE ITI TF-2a 3.20.7.1: the MSGID of an audit message
BATCHES_PER_RUN = 10  # at most this many batches per scheduled run: a backlog drains over runs
BATCH = 100


def syslog_frame(message: str, *, at: datetime, outcome: int, hostname: str) -> bytes:
    """One RFC 5424 message: header, no structured data, the XML after a UTF-8 BOM."""
    priority = FACILITY_AUTHPRIV * 8 + SEVERITY.get(outcome, 4)
    timestamp = at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    header = f"<{priority}>1 {timestamp} {hostname or '-'} dicom-node {os.getpid()} {MSGID} - "
    return header.encode("ascii", "replace") + b"\xef\xbb\xbf" + message.encode()


class SyslogShipper:
    """Sends audit lines to one collector; `ship` is the scheduler's periodic duty."""

    def __init__(self, settings: SyslogSettings, *, source_id: str, node_ae: str, ca: Path | None = None):
        self.settings = settings
        self.ca = ca  # settings.ca resolved against the configuration's folder
        self.source_id = source_id
        self.node_ae = node_ae
        self.hostname = socket.gethostname()[:255]
        self._failing = False

    def ship(self, joblog: JobLog) -> int:
        """Send what is unshipped, a few batches at most; returns how many lines went."""
        shipped = 0
        try:
            for _ in range(BATCHES_PER_RUN):
                sent = joblog.ship_audit(self.send, BATCH)
                shipped += sent
                if sent < BATCH:
                    break
        except OSError as exc:
            if not self._failing:  # once per outage, not once per run
                log.warning(
                    "audit: syslog collector %s unreachable (%s); lines kept, sent when it answers", self.peer, exc
                )
            self._failing = True
            return shipped
        if self._failing:
            log.info("audit: syslog collector %s answers again", self.peer)
        self._failing = False
        return shipped

    @property
    def peer(self) -> str:
        return f"{self.settings.protocol}://{self.settings.host}:{self.settings.resolved_port}"

    def send(self, events: Sequence[AuditSnapshot]) -> None:
        """Send `events` in order; raises OSError (ssl.SSLError included) when they did not all go."""
        frames = [
            syslog_frame(
                audit_message(event, source_id=self.source_id, node_ae=self.node_ae),
                at=event.at,
                outcome=event.outcome,
                hostname=self.hostname,
            )
            for event in events
        ]
        settings = self.settings
        address = (settings.host, settings.resolved_port)
        if settings.protocol == "udp":
            with socket.socket(_family(settings.host), socket.SOCK_DGRAM) as udp:
                udp.settimeout(settings.timeout_s)
                for frame in frames:
                    udp.sendto(frame, address)
            return
        # RFC 6587 / 5425 octet counting: "LENGTH SP MESSAGE", so the XML may hold newlines
        payload = b"".join(f"{len(frame)} ".encode() + frame for frame in frames)
        with socket.create_connection(address, timeout=settings.timeout_s) as raw:
            if settings.protocol == "tcp":
                raw.sendall(payload)
                return
            context = ssl.create_default_context(cafile=str(self.ca) if self.ca else None)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            with context.wrap_socket(raw, server_hostname=settings.host) as tls:
                tls.sendall(payload)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
