"""Who may store to the node: the calling-AE allow-list of [[sources]], optionally bound to hosts.

A source is the pair (calling AE title, network): two units may share an AE title on different
hosts and get different profiles. A known AE title calling from a host outside its networks is
answered like an unknown one — "calling AE title not recognised" — because the pair it presents
names no source we know; the log says which of the two it was.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from dicom_node.config import SELFTEST_PROFILE, Config
from dicom_node.errors import ConfigurationError, NodeError


@dataclass(frozen=True)
class Rejection:
    """An A-ASSOCIATE-RJ: result, source and reason as PS3.8 9.3.4 numbers them."""

    result: int
    source: int
    reason: int
    text: str


CALLING_AE_NOT_RECOGNISED = Rejection(0x01, 0x01, 0x03, "rejected-permanent, calling AE title not recognised")
CALLED_AE_NOT_RECOGNISED = Rejection(0x01, 0x01, 0x07, "rejected-permanent, called AE title not recognised")
LOCAL_LIMIT_EXCEEDED = Rejection(0x02, 0x03, 0x02, "rejected-transient, local limit exceeded")
NO_REASON_TRANSIENT = Rejection(0x02, 0x01, 0x01, "rejected-transient, no reason given")


class Refused(NodeError):
    """An association the node will not accept, with the rejection to send and why (for the log)."""

    def __init__(self, rejection: Rejection, why: str):
        super().__init__(why)
        self.rejection = rejection
        self.why = why


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The peer address, an IPv4-mapped IPv6 one (from a dual-stack bind) read as IPv4."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


class AllowList:
    """Maps (calling AE, peer host) to the profile its images are processed with.

    With no [[sources]] configured every calling AE is accepted and gets the first profile: the
    embedded defaults work out of the box on loopback; a site names its modalities to close it.
    """

    def __init__(self, config: Config):
        if not config.sources and not config.profiles:
            raise ConfigurationError("no [[sources]] and no [profiles]: received images would have no profile")
        self.sources = config.sources
        self.selftest_ae = config.selftest.calling_ae if SELFTEST_PROFILE in config.profiles else None
        self.default_profile = next(iter(config.profiles)) if not config.sources else None

    @property
    def is_open(self) -> bool:
        return self.default_profile is not None

    def admit(self, calling_ae: str, peer_host: str) -> str:
        """The profile for images from `calling_ae` at `peer_host`; raises Refused otherwise."""
        if self.selftest_ae and calling_ae.strip() == self.selftest_ae:
            address = _address(peer_host)
            if address is not None and address.is_loopback:
                return SELFTEST_PROFILE
        if self.default_profile is not None:
            return self.default_profile
        calling_ae = calling_ae.strip()
        known = [s for s in self.sources if s.ae_title.strip() == calling_ae]
        if not known:
            raise Refused(CALLING_AE_NOT_RECOGNISED, f"calling AE {calling_ae!r} is not in [[sources]]")
        address = _address(peer_host)
        for source in known:
            if not source.hosts or (
                address is not None and any(address in ipaddress.ip_network(host, strict=True) for host in source.hosts)
            ):
                return source.profile
        networks = ", ".join(h for s in known for h in s.hosts)
        raise Refused(
            CALLING_AE_NOT_RECOGNISED,
            f"calling AE {calling_ae!r} is known but {peer_host} is outside its hosts ({networks})",
        )
