"""Live counters of the receiver: associations and C-STORE requests, as Prometheus counters.

Only the receiver sees associations (the job log records images, not connections), so these are
counted in memory where they happen, on a registry of their own; `qa.metrics.build_registry`
serves them with the job log's figures. They start from zero when the process starts, which
Prometheus's rate() and increase() take as a counter reset. Nothing here may import the
restoration code: the receive path answers the modality in milliseconds.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from dicom_node.receive.allowlist import (
    CALLED_AE_NOT_RECOGNISED,
    CALLING_AE_NOT_RECOGNISED,
    LOCAL_LIMIT_EXCEEDED,
    NO_REASON_TRANSIENT,
    Rejection,
)

REGISTRY = CollectorRegistry()

# Why the node rejected an association, as a label value. The node's own rejections (receive/scp.py
# `_admit`) say which check refused it; pynetdicom's only one here is the max_associations limit.
REJECTION_REASONS: dict[Rejection, str] = {
    CALLING_AE_NOT_RECOGNISED: "calling_ae_not_recognised",
    CALLED_AE_NOT_RECOGNISED: "called_ae_not_recognised",
    LOCAL_LIMIT_EXCEEDED: "disk_low",  # the one local limit `_admit` checks: min_free_disk_mb
    NO_REASON_TRANSIENT: "admission_check_failed",
}
ASSOCIATION_LIMIT = "association_limit"
STATUS_CLASSES = ("success", "warning", "refused", "error")

associations_accepted = Counter(
    "dicom_node_associations_accepted_total", "Associations accepted by the storage SCP.", registry=REGISTRY
)
associations_rejected = Counter(
    "dicom_node_associations_rejected_total",
    "Associations rejected by the storage SCP, by reason.",
    ["reason"],
    registry=REGISTRY,
)
associations_aborted = Counter(
    "dicom_node_associations_aborted_total",
    "Associations that ended in an abort (by the peer, or by the node).",
    registry=REGISTRY,
)
store_requests = Counter(
    "dicom_node_cstore_requests_total",
    "C-STORE requests answered, by DICOM status class of the response.",
    ["status"],
    registry=REGISTRY,
)

# Every label value exists from the start, so a series reads 0 instead of being absent.
for _reason in (*REJECTION_REASONS.values(), ASSOCIATION_LIMIT):
    associations_rejected.labels(reason=_reason)
for _status in STATUS_CLASSES:
    store_requests.labels(status=_status)


def rejection_reason(rejection: Rejection) -> str:
    """The `reason` label of a rejection the node sends (`admission_check_failed` when unknown)."""
    return REJECTION_REASONS.get(rejection, "admission_check_failed")


def status_class(status: int) -> str:
    """The class of a C-STORE response status (PS3.4 B.2.3, PS3.7 C): success, warning, refused, error.

    Refused (0xA7xx out of resources, 0x0122 SOP class not supported) and error (0xA9xx dataset
    does not match the SOP class, 0xCxxx cannot understand, anything else) are both failures;
    refused ones are the node's (the modality keeps the image and sends it again), errors the data's.
    """
    if status == 0x0000:
        return "success"
    if status in (0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF:
        return "warning"
    if 0xA700 <= status <= 0xA7FF or status == 0x0122:
        return "refused"
    return "error"
