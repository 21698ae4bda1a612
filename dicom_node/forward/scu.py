"""Storage and Verification SCU: one association per call, bounded by a watchdog.

pynetdicom's own timeouts do not bound a send: when the peer stops reading, its DUL thread stays in
``socket.send`` and ``send_c_store`` never returns (docs/dicom.md). So every association runs in a
thread of its own; when ``timeout_s`` has passed, the watchdog shuts the socket down (which ends the
blocked send) and wakes the DIMSE call waiting for its response, so that thread ends too.

Every outcome is a `SendResult` that tells the retry policy whether trying again can help.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # generated at import; mypy can't see them
    StorageCommitmentPushModel,
    Verification,
)
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, STORAGE_SERVICE_CLASS_STATUS

LOG = logging.getLogger(__name__)

GRACE_S = 5.0
"""How long the watchdog waits for the association thread after shutting its socket down."""

# Failures a later attempt can get past (PS3.4 B.2.3, PS3.7 C): the peer is short of resources,
# busy, or had an internal error. Every other defined failure says the object or the SOP class is
# refused, and sending it again would be refused again. Undefined codes count as transient: the
# retry policy's maximum age bounds them, while a wrong "permanent" would drop an image.
TRANSIENT_STATUSES = frozenset(range(0xA700, 0xA800)) | {0x0110, 0x0210, 0x0213, 0xFE00}


@dataclass(frozen=True)
class SendResult:
    """The outcome of one send or echo; ``transient`` matters only when not ``ok``."""

    ok: bool
    transient: bool
    status: int | None  # DICOM status of the response, None when there was none
    message: str  # one line for a person, naming the peer
    seconds: float


def _ok(message: str, status: int | None = None) -> SendResult:
    return SendResult(True, False, status, message, 0.0)


def _transient(message: str, status: int | None = None) -> SendResult:
    return SendResult(False, True, status, message, 0.0)


def _permanent(message: str, status: int | None = None) -> SendResult:
    return SendResult(False, False, status, message, 0.0)


def send_file(
    path: str | os.PathLike,
    *,
    ae_title: str,
    host: str,
    port: int,
    calling_ae: str,
    timeout_s: float,
    commitment_uid: str | None = None,
) -> SendResult:
    """C-STORE one DICOM file, decompressing it when the peer takes only Explicit VR Little Endian.

    With `commitment_uid`, a stored file is also the subject of a Storage Commitment request
    (N-ACTION, push model) with that Transaction UID on the same association; PACS answers later,
    on an association of its own (N-EVENT-REPORT, `dicom_node.forward.commitment`)."""
    started = time.monotonic()
    peer = f"{ae_title}@{host}:{port}"
    try:
        dataset = dcmread(path)
        sop_class = UID(dataset.SOPClassUID)
        syntax = dataset.file_meta.TransferSyntaxUID
    except (OSError, InvalidDicomError, AttributeError) as exc:
        result = _permanent(f"{peer}: cannot read {os.fspath(path)}: {exc}")
    else:
        # Separate contexts, so that a peer taking both lets the file go as it is.
        contexts = [build_context(sop_class, ts) for ts in dict.fromkeys([syntax, ExplicitVRLittleEndian])]
        if commitment_uid is not None:
            contexts.append(build_context(StorageCommitmentPushModel))

        def store(assoc: Association) -> SendResult:
            stored = _store(assoc, dataset, peer)
            if not stored.ok or commitment_uid is None:
                return stored
            return _request_commitment(assoc, dataset, commitment_uid, peer, stored)

        result = _exchange(
            store,
            contexts,
            peer=peer,
            ae_title=ae_title,
            host=host,
            port=port,
            calling_ae=calling_ae,
            timeout_s=timeout_s,
        )
    return replace(result, seconds=time.monotonic() - started)


def echo(*, ae_title: str, host: str, port: int, calling_ae: str, timeout_s: float) -> SendResult:
    """C-ECHO the peer: is it there, and does it accept us?"""
    started = time.monotonic()
    peer = f"{ae_title}@{host}:{port}"
    result = _exchange(
        lambda assoc: _echo(assoc, peer),
        [build_context(Verification)],
        peer=peer,
        ae_title=ae_title,
        host=host,
        port=port,
        calling_ae=calling_ae,
        timeout_s=timeout_s,
    )
    return replace(result, seconds=time.monotonic() - started)


def _store(assoc: Association, dataset: Dataset, peer: str) -> SendResult:
    sop_class = UID(dataset.SOPClassUID)
    accepted = {cx.transfer_syntax[0] for cx in assoc.accepted_contexts}  # all for this SOP class
    syntax = dataset.file_meta.TransferSyntaxUID
    decompress = syntax not in accepted and syntax.is_compressed
    if decompress:
        try:
            dataset.decompress(generate_instance_uid=False)
        except Exception as exc:  # any decoder error: this file cannot go to this peer
            return _permanent(f"{peer}: takes only uncompressed data and {syntax.name} cannot be decoded: {exc}")
    try:
        response = assoc.send_c_store(dataset)
    except (ValueError, AttributeError) as exc:  # not encodable in any accepted transfer syntax
        return _permanent(f"{peer}: cannot send {sop_class.name} in {syntax.name}: {exc}")
    if "Status" not in response:
        return _transient(f"{peer}: no C-STORE response (association aborted or timed out)")
    result = _classify_store_status(peer, int(response.Status))
    return replace(result, message=f"{result.message} (decompressed from {syntax.name})") if decompress else result


STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # the well-known SOP instance (PS3.4 J.3.5)


def _request_commitment(
    assoc: Association, dataset: Dataset, transaction_uid: str, peer: str, stored: SendResult
) -> SendResult:
    """Ask PACS to commit to keep the stored instance; a refusal or no answer: retried like a failed send."""
    if not any(cx.abstract_syntax == StorageCommitmentPushModel for cx in assoc.accepted_contexts):
        return _permanent(f"{peer}: stored, but does not accept Storage Commitment (push model)")
    request = Dataset()
    request.TransactionUID = transaction_uid
    item = Dataset()
    item.ReferencedSOPClassUID = dataset.SOPClassUID
    item.ReferencedSOPInstanceUID = dataset.SOPInstanceUID
    request.ReferencedSOPSequence = [item]
    status, _ = assoc.send_n_action(request, 1, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE)
    if "Status" not in status:
        return _transient(f"{peer}: stored, but no answer to the storage commitment request")
    if int(status.Status) != 0x0000:
        return _transient(
            f"{peer}: stored, but the storage commitment request failed (status 0x{int(status.Status):04X})"
        )
    return replace(stored, message=f"{stored.message}; storage commitment asked (transaction {transaction_uid})")


def _classify_store_status(peer: str, status: int) -> SendResult:
    category, meaning = STORAGE_SERVICE_CLASS_STATUS.get(status, ("", ""))
    if not category and status & 0xF000 == 0xB000:
        category = STATUS_WARNING  # PS3.7 C: Bxxx is a warning
    described = f"status 0x{status:04X}" + (f" ({meaning})" if meaning else "")
    if category == STATUS_SUCCESS:
        return _ok(f"{peer}: stored", status)
    if category == STATUS_WARNING:
        return _ok(f"{peer}: stored with warning {described}", status)
    if status in TRANSIENT_STATUSES or not category:
        return _transient(f"{peer}: store failed, {described}", status)
    return _permanent(f"{peer}: store refused, {described}", status)


def _echo(assoc: Association, peer: str) -> SendResult:
    response = assoc.send_c_echo()
    if "Status" not in response:
        return _transient(f"{peer}: no C-ECHO response (association aborted or timed out)")
    status = int(response.Status)
    if status == 0:
        return _ok(f"{peer}: echo ok", status)
    return _transient(f"{peer}: echo answered status 0x{status:04X}", status)


def _exchange(
    action: Callable[[Association], SendResult],
    contexts: list[PresentationContext],
    *,
    peer: str,
    ae_title: str,
    host: str,
    port: int,
    calling_ae: str,
    timeout_s: float,
) -> SendResult:
    """Associate, run ``action``, release — in a thread the watchdog can free after ``timeout_s``."""
    ae = AE(ae_title=calling_ae)
    ae.requested_contexts = contexts
    ae.maximum_pdu_size = 0  # unlimited
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    state: dict = {}

    def on_connection_open(event: evt.Event) -> None:
        state["assoc"] = event.assoc

    def on_pdu(event: evt.Event) -> None:
        # pynetdicom reports a rejection as an abort when the peer closes the connection right after
        # its A-ASSOCIATE-RJ (as DCMTK does) before the requesting thread looks: keep the PDU itself.
        if isinstance(event.pdu, A_ASSOCIATE_RJ):
            state["rejection"] = event.pdu.to_primitive()

    def run() -> None:
        try:
            assoc = ae.associate(
                host,
                port,
                ae_title=ae_title,
                max_pdu=0,
                evt_handlers=[(evt.EVT_CONN_OPEN, on_connection_open), (evt.EVT_PDU_RECV, on_pdu)],
            )
            if not assoc.is_established:
                state["result"] = _not_established(
                    assoc, peer, state.get("rejection"), opened="assoc" in state, host=host, port=port
                )
                return
            try:
                state["result"] = action(assoc)
            finally:
                if assoc.is_established:
                    assoc.release()
        except BaseException as exc:  # re-raised in the caller's thread
            state["error"] = exc

    worker = threading.Thread(target=run, name=f"dicom-scu {peer}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        _interrupt(state.get("assoc"))
        worker.join(GRACE_S)
        if worker.is_alive():
            LOG.error("%s: association thread still running %.0f s after the watchdog fired", peer, GRACE_S)
        result = state.get("result")
        if result is None or not result.ok:  # a store acknowledged before a hung release still counts
            return _transient(f"{peer}: no answer within {timeout_s:g} s; association aborted by the watchdog")
    if "error" in state:
        raise state["error"]
    return state["result"]


def _interrupt(assoc: Association | None) -> None:
    """Free a thread stuck in an association: end its socket, wake its DIMSE wait."""
    if assoc is None:  # not connected yet: the connection timeout ends it
        return
    sock = getattr(assoc.dul.socket, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # a thread blocked in socket.send gets an error now
    assoc.dimse.msg_queue.put((None, None))  # read by send_c_store/send_c_echo as "no response"


def _not_established(
    assoc: Association, peer: str, rejection: A_ASSOCIATE | None, *, opened: bool, host: str, port: int
) -> SendResult:
    if rejection is not None:
        reason = _first_lower(rejection.reason_str)
        if rejection.result == 2:
            return _transient(f"{peer}: association rejected transiently: {reason}")
        return _permanent(f"{peer}: association rejected permanently: {reason}")
    if assoc.rejected_contexts and not assoc.accepted_contexts:  # pynetdicom aborts such an association
        # Every requested context names its abstract syntax.
        syntaxes = [cx.abstract_syntax for cx in assoc.rejected_contexts if cx.abstract_syntax is not None]
        refused = ", ".join(sorted({UID(syntax).name for syntax in syntaxes}))
        return _permanent(f"{peer}: does not accept {refused} (no presentation context accepted)")
    if opened:
        return _transient(f"{peer}: association aborted or not answered during negotiation")
    return _transient(f"{peer}: cannot connect: {_connect_error(host, port)}")


def _connect_error(host: str, port: int) -> str:
    """Why a TCP connection fails, asked once more (pynetdicom only logs it)."""
    try:
        with socket.create_connection((host, port), timeout=3):
            return "the connection failed, but the port answers now"
    except OSError as exc:
        return (exc.strerror or str(exc) or type(exc).__name__).lower()


def _first_lower(text: str) -> str:
    """pynetdicom's "Calling AE title not recognised" inside a sentence: keep "AE" as it is."""
    return text[:1].lower() + text[1:]
