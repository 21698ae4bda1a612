"""PACS's answers to storage commitment requests (N-EVENT-REPORT, push model, PS3.4 J).

PACS reports on an association of its own, to the node's AE title: the receiver admits each
destination with `storage_commitment` for that, and hands its reports here. A send is done only
when its report lists the instance as committed; a failure, or no report by `commitment_timeout_s`
(see `Dispatcher`), sends it again on the retry policy.
"""

from __future__ import annotations

import logging

from pydicom.dataset import Dataset
from pynetdicom import evt

from dicom_node.forward.dispatch import Dispatcher

log = logging.getLogger("dicom_node.forward")

SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110
# PS3.4 J.3.3.1.1: why an instance was not committed
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0213: "resource limitation",
    0x0122: "referenced SOP class not supported",
    0x0119: "class / instance conflict",
    0x0131: "duplicate transaction UID",
}


class CommitmentListener:
    def __init__(self, dispatcher: Dispatcher):
        self.dispatcher = dispatcher
        self.joblog = dispatcher.joblog

    def on_report(self, event: evt.Event) -> tuple[int, Dataset | None]:
        """The EVT_N_EVENT_REPORT handler: settle the send the report is about."""
        report: Dataset = event.event_information
        transaction_uid = str(report.get("TransactionUID", ""))
        reporter = event.assoc.requestor.ae_title.strip()
        delivery = self.joblog.find_commitment(transaction_uid)
        if delivery is None:  # settled already (a late report), or never ours
            log.warning(
                "storage commitment report from %s for unknown transaction %s: ignored", reporter, transaction_uid
            )
            return SUCCESS, None
        destination = next((d for d in self.dispatcher.config.destinations if d.name == delivery.destination), None)
        if destination is None or destination.ae_title != reporter:
            log.warning(
                "storage commitment report for transaction %s came from %s, not from %s: ignored",
                transaction_uid,
                reporter,
                delivery.destination,
            )
            return PROCESSING_FAILURE, None
        job = self.joblog.get_job(delivery.job_id)
        if job is None:
            return SUCCESS, None
        instance = job.derived_sop_instance_uid if delivery.kind == "derived" else job.sop_instance_uid
        committed = {str(item.get("ReferencedSOPInstanceUID", "")) for item in report.get("ReferencedSOPSequence", [])}
        if instance in committed:
            self.joblog.delivery_committed(delivery.id)
            log.info("job %s: %s committed by %s", job.id, delivery.kind, delivery.destination)
            return SUCCESS, None
        failures = {
            str(item.get("ReferencedSOPInstanceUID", "")): int(item.get("FailureReason", PROCESSING_FAILURE))
            for item in report.get("FailedSOPSequence", [])
        }
        reason = failures.get(instance or "")
        why = (
            f"not committed: failure reason 0x{reason:04X} ({FAILURE_REASONS.get(reason, 'unknown')})"
            if reason is not None
            else "not in its storage commitment report"
        )
        self.dispatcher.failed(delivery, f"{delivery.destination}: {why}", status=reason, transient=True)
        return SUCCESS, None
