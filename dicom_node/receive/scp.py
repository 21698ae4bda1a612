"""The Storage SCP the modality talks to: accept, spool, record, answer — in milliseconds.

Nothing here decodes pixels: the handler reads the header for the job row, checks that the Pixel
Data can hold the pixels it describes (receive/checks.py), writes the bytes exactly as received
and answers. Success is sent only after the file is on stable storage and its job is committed;
when either fails the modality hears 0xA700 and keeps the image to send again.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import TYPE_CHECKING, cast

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # generated at import; mypy can't see them
    StorageCommitmentPushModel,
    Verification,
)

from dicom_node.config import Config
from dicom_node.errors import InputRefused, NodeError, Unavailable
from dicom_node.imaging.read import LOSSLESS_TRANSFER_SYNTAXES, MG_FOR_PROCESSING
from dicom_node.joblog import AuditOutcome, JobLog
from dicom_node.receive import counters
from dicom_node.receive.allowlist import (
    CALLED_AE_NOT_RECOGNISED,
    LOCAL_LIMIT_EXCEEDED,
    NO_REASON_TRANSIENT,
    AllowList,
    Refused,
    Rejection,
)
from dicom_node.receive.checks import image_problem
from dicom_node.receive.spool import Spool

if TYPE_CHECKING:
    from pynetdicom.events import EventHandlerType
    from pynetdicom.pdu_primitives import A_ASSOCIATE
    from pynetdicom.transport import ThreadedAssociationServer

log = logging.getLogger("dicom_node.receive")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900
SOP_CLASS_NOT_SUPPORTED = 0x0122
CANNOT_UNDERSTAND = 0xC000

# The SOP classes the node stores: those it can restore, and those a profile passes through
# unchanged (`pass_through`). Every other one (MG For Presentation, unless passed) is refused at
# negotiation, presentation context result 0x03 "abstract syntax not supported", so the modality
# knows at once instead of hearing Success for a job that must fail.
STORAGE_SOP_CLASSES: tuple[str, ...] = (MG_FOR_PROCESSING,)

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_MEGABYTE = 1 << 20


class NotUnderstood(InputRefused):
    """A received dataset the node cannot take: its status code and a comment for the sender."""

    def __init__(self, status: int, comment: str):
        super().__init__(comment)
        self.status = status


def store_failure_status(exc: BaseException) -> tuple[int, str]:
    """The C-STORE status and comment for a store that failed with `exc` (the one place that maps them).

    A refused dataset gets its own status (0xC000 family, 0xA900); everything else — disk full,
    job log locked, a bug — is 0xA700: the image is not safe here, so the modality keeps it and
    sends it again.
    """
    if isinstance(exc, NotUnderstood):
        return exc.status, str(exc)
    if isinstance(exc, InputRefused):
        return CANNOT_UNDERSTAND, str(exc)
    if isinstance(exc, Unavailable):
        return OUT_OF_RESOURCES, f"not stored: {exc}"
    return OUT_OF_RESOURCES, f"not stored: {type(exc).__name__}"


@dataclass(frozen=True)
class Header:
    """The few attributes the job row needs, read without touching the pixels."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    station_name: str | None
    detector_serial: str | None
    patient_id: str | None  # for the audit trail only: never logged unless [audit] log_patient_data


def read_dataset(data: bytes) -> Dataset:
    """Parse a received file whole: the checks need the Pixel Data's length (its bytes, never decoded)."""
    try:
        return pydicom.dcmread(BytesIO(data))
    except Exception as exc:
        raise NotUnderstood(CANNOT_UNDERSTAND, f"unreadable dataset: {type(exc).__name__}") from exc


def read_header(ds: Dataset, *, context_sop_class_uid: str, sop_class_uid: str, sop_instance_uid: str) -> Header:
    """The job row's attributes of a received dataset, once its UIDs are checked.

    `context_sop_class_uid` is the presentation context's abstract syntax, `sop_class_uid` and
    `sop_instance_uid` the C-STORE request's: the dataset must agree with all three (pynetdicom
    does not compare the request with its context). UIDs become folder and file names, so they
    must be digits and dots only. The detector is named as the worker looks it up (Device Serial
    Number, else Detector ID: imaging.read.acquisition_params).
    """
    try:
        uids = {
            name: str(ds.get(name, "") or "").strip()
            for name in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
        }
        station_name, device_serial, detector_id, patient_id = (
            str(ds.get(name, "") or "").strip() or None
            for name in ("StationName", "DeviceSerialNumber", "DetectorID", "PatientID")
        )
    except Exception as exc:
        raise NotUnderstood(CANNOT_UNDERSTAND, f"unreadable dataset: {type(exc).__name__}") from exc
    for name, uid in uids.items():
        if not uid:
            raise NotUnderstood(CANNOT_UNDERSTAND, f"dataset lacks {name}")
        if len(uid) > 64 or not _UID.fullmatch(uid):
            raise NotUnderstood(CANNOT_UNDERSTAND, f"{name} is not a valid UID")
    if uids["SOPClassUID"] != context_sop_class_uid:
        raise NotUnderstood(
            DOES_NOT_MATCH_SOP_CLASS,
            f"SOPClassUID differs from the presentation context's "
            f"({UID(uids['SOPClassUID']).name}, not {UID(context_sop_class_uid).name})",
        )
    if uids["SOPClassUID"] != sop_class_uid:
        raise NotUnderstood(DOES_NOT_MATCH_SOP_CLASS, "SOPClassUID differs from the request's")
    if uids["SOPInstanceUID"] != sop_instance_uid:
        raise NotUnderstood(CANNOT_UNDERSTAND, "SOPInstanceUID differs from the request's")
    return Header(
        uids["SOPClassUID"],
        uids["SOPInstanceUID"],
        uids["StudyInstanceUID"],
        uids["SeriesInstanceUID"],
        station_name,
        device_serial or detector_id,
        patient_id,
    )


def check_image(ds: Dataset, transfer_syntax: str) -> None:
    """Refuse (0xC000) an image whose pixels could not be read: receive/checks.py says why."""
    try:
        problem = image_problem(ds, transfer_syntax)
    except Exception as exc:  # a pixel attribute's value pydicom cannot convert
        problem = f"unreadable pixel description: {type(exc).__name__}"
    if problem is not None:
        raise NotUnderstood(CANNOT_UNDERSTAND, problem)


def _status_name(status: object) -> str:
    """A job's status as text, whether it is a str, a StrEnum or a plain Enum (as a test's job log hands out)."""
    return str(getattr(status, "value", status))


def _primitive(primitive: A_ASSOCIATE | None, side: str) -> A_ASSOCIATE:
    """The A-ASSOCIATE primitive of one side; pynetdicom sets it before the events handled here fire."""
    if primitive is None:
        raise RuntimeError(f"the association has no A-ASSOCIATE primitive of the {side}")
    return primitive


def _status(code: int, comment: str) -> Dataset:
    """A C-STORE failure status with an Error Comment the sender's log shows (LO: 64 characters)."""
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment.encode("ascii", "replace").decode()[:64]
    return status


class StorageSCP:
    """The node's Storage SCP: C-ECHO, and C-STORE of the STORAGE_SOP_CLASSES (MG For Processing).

    `port` overrides node.port (0: any free port, for tests); `.port` is the bound one.
    """

    def __init__(
        self,
        config: Config,
        sink: JobLog,
        *,
        port: int | None = None,
        commitment_reports: Callable[[evt.Event], tuple[int, Dataset | None]] | None = None,
    ):
        self.config = config
        self.sink = sink
        self.allowlist = AllowList(config)
        # PACS answering storage commitment requests calls in with N-EVENT-REPORT (forward/commitment.py)
        self.commitment_reports = commitment_reports
        self.reporters = {
            d.ae_title: d.host for d in config.destinations if d.storage_commitment and d.ae_title and d.host
        }
        self.spool = Spool(config.data_dir / "spool", config.node.file_mode)
        self._requested_port = config.node.port if port is None else port
        self._server: ThreadedAssociationServer | None = None
        # Serialises the duplicate check with the job insert per SOP Instance UID (striped, so
        # different images from parallel associations do not wait for each other).
        self._uid_locks = [threading.Lock() for _ in range(64)]

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the SCP is not running")
        return self._server.server_address[1]

    def start(self) -> None:
        """Listen in background threads; returns at once."""
        node = self.config.node
        self.spool.prepare()
        ae = AE(ae_title=node.ae_title)
        ae.maximum_pdu_size = 0
        ae.maximum_associations = node.max_associations
        ae.acse_timeout = node.acse_timeout_s
        ae.dimse_timeout = node.dimse_timeout_s
        ae.network_timeout = node.network_timeout_s
        ae.add_supported_context(Verification)
        if self.commitment_reports is not None and self.reporters:
            ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
        passed = [uid for profile in self.config.profiles.values() for uid in profile.pass_through]
        for sop_class in dict.fromkeys([*STORAGE_SOP_CLASSES, *passed]):
            ae.add_supported_context(sop_class, LOSSLESS_TRANSFER_SYNTAXES)
        handlers: list[EventHandlerType] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_RELEASED, self._on_closed, ["released"]),
            (evt.EVT_ABORTED, self._on_closed, ["aborted"]),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        if self.commitment_reports is not None:
            handlers.append((evt.EVT_N_EVENT_REPORT, self.commitment_reports))
        # Non-blocking, start_server always returns the server.
        self._server = ae.start_server((node.bind, self._requested_port), block=False, evt_handlers=handlers)
        if self.allowlist.is_open:
            log.warning(
                "no [[sources]] configured: accepting any calling AE, profile %r", self.allowlist.default_profile
            )
        log.info("storage SCP %s listening on %s:%d", node.ae_title, node.bind, self.port)

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop listening; stores in progress may finish for `grace_s`, then what is left is aborted.

        An aborted store was never answered, so the modality keeps the image and sends it again.
        """
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        deadline = time.monotonic() + grace_s
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in server.active_associations:
            assoc.abort()
        log.info("storage SCP stopped")

    def __enter__(self) -> StorageSCP:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # Association

    def _free_mb(self) -> float:
        try:
            return shutil.disk_usage(self.config.data_dir).free / _MEGABYTE
        except OSError:
            return 0.0

    def _admit(self, calling_ae: str, called_ae: str, host: str) -> str:
        """The profile of the association's images; raises Refused with the A-ASSOCIATE-RJ to send."""
        node = self.config.node
        if called_ae.strip() != node.ae_title:
            raise Refused(CALLED_AE_NOT_RECOGNISED, f"called AE {called_ae.strip()!r} is not {node.ae_title!r}")
        try:
            profile = self.allowlist.admit(calling_ae, host)
        except Refused:
            if not self._reports_commitments(calling_ae, host):
                raise
            return ""  # a PACS reporting on storage commitment: it stores nothing here
        free_mb = self._free_mb()
        if free_mb < node.min_free_disk_mb:
            raise Refused(
                LOCAL_LIMIT_EXCEEDED,
                f"{free_mb:.0f} MB free under {self.config.data_dir}, "
                f"below min_free_disk_mb = {node.min_free_disk_mb:g}",
            )
        return profile

    def _reports_commitments(self, calling_ae: str, host: str) -> bool:
        """Is this a destination that answers storage commitment requests, calling from its own host?"""
        expected = self.reporters.get(calling_ae.strip())
        if expected is None or self.commitment_reports is None:
            return False
        try:
            addresses = {info[4][0] for info in socket.getaddrinfo(expected, None)}
        except OSError:
            return False
        return host in addresses or host.removeprefix("::ffff:") in addresses

    def _on_requested(self, event: evt.Event) -> None:
        """Reject here, before negotiation, so the peer hears the real reason (PS3.8 9.3.4).

        Fails closed: pynetdicom would accept the association if this handler raised.
        """
        assoc = event.assoc
        request = _primitive(assoc.requestor.primitive, "requestor")
        calling_ae, host = request.calling_ae_title.strip(), assoc.requestor.address
        rejection: Rejection | None = None
        try:
            self._admit(calling_ae, request.called_ae_title, host)
        except Refused as refused:
            log.warning("association %s@%s rejected (%s): %s", calling_ae, host, refused.rejection.text, refused.why)
            rejection = refused.rejection
        except Exception:
            log.exception("association %s@%s rejected: admission check failed", calling_ae, host)
            rejection = NO_REASON_TRANSIENT
        if rejection is not None:
            counters.associations_rejected.labels(reason=counters.rejection_reason(rejection)).inc()
            assoc.acse.send_reject(rejection.result, rejection.source, rejection.reason)
            assoc.kill()
            self._audit_association(calling_ae, host, rejection.text, called_ae=request.called_ae_title.strip())

    def _on_rejected(self, event: evt.Event) -> None:
        """pynetdicom's own rejection: in this node only max_associations leads there."""
        counters.associations_rejected.labels(reason=counters.ASSOCIATION_LIMIT).inc()
        reply = _primitive(event.assoc.acceptor.primitive, "acceptor")
        calling_ae = _primitive(event.assoc.requestor.primitive, "requestor").calling_ae_title.strip()
        log.warning(
            "association %s@%s rejected by the association limit (%d): result %d, source %d, reason %d",
            calling_ae,
            event.assoc.requestor.address,
            self.config.node.max_associations,
            reply.result,
            reply.result_source,
            reply.diagnostic,
        )
        limit = f"association limit ({self.config.node.max_associations}) reached"
        self._audit_association(calling_ae, event.assoc.requestor.address, limit)

    def _on_established(self, event: evt.Event) -> None:
        """Log the association; when it can store nothing here, also what it proposed (IT's first question)."""
        assoc = event.assoc
        requestor = assoc.requestor
        counters.associations_accepted.inc()
        log.info("association %s@%s:%d accepted", requestor.ae_title, requestor.address, requestor.port)
        self._audit_association(requestor.ae_title.strip(), requestor.address, None, port=requestor.port)
        if assoc.rejected_contexts and not any(
            cx.abstract_syntax in STORAGE_SOP_CLASSES for cx in assoc.accepted_contexts
        ):
            refused = sorted({cx.abstract_syntax.name for cx in assoc.rejected_contexts if cx.abstract_syntax})
            log.warning(
                "association %s@%s proposes no SOP class this node stores (%s): refused %s",
                requestor.ae_title,
                requestor.address,
                ", ".join(UID(uid).name for uid in STORAGE_SOP_CLASSES),
                ", ".join(refused),
            )

    def _audit_association(self, calling_ae: str, host: str, rejected: str | None, **detail: object) -> None:
        """An association accepted (`rejected` None) or rejected, in the audit trail. A job log that
        cannot take it is logged and does not change the answer: the association is decided."""
        try:
            self.sink.audit(
                "association-rejected" if rejected else "association-accepted",
                actor=calling_ae,
                address=host,
                outcome=AuditOutcome.serious_failure if rejected else AuditOutcome.success,
                reason=rejected,
                **detail,
            )
        except Exception:
            log.exception("association %s@%s: not written to the audit trail", calling_ae, host)

    def _on_closed(self, event: evt.Event, how: str) -> None:
        requestor = event.assoc.requestor
        if how == "aborted":
            counters.associations_aborted.inc()
        log.info("association %s@%s %s", requestor.ae_title, requestor.address, how)

    def _on_echo(self, event: evt.Event) -> int:
        log.info("C-ECHO from %s@%s", event.assoc.requestor.ae_title, event.assoc.requestor.address)
        return SUCCESS

    # Storage

    def _on_store(self, event: evt.Event) -> int | Dataset:
        started = time.perf_counter()
        requestor = event.assoc.requestor
        calling_ae, host = requestor.ae_title.strip(), requestor.address
        request = cast(C_STORE, event.request)  # EVT_C_STORE's request is a C-STORE
        data = event.encoded_dataset()
        transfer_syntax = str(event.context.transfer_syntax)
        try:
            ds = read_dataset(data)
            # A UID missing from the request ("") matches no dataset's: read_header refuses it.
            header = read_header(
                ds,
                context_sop_class_uid=str(event.context.abstract_syntax),
                sop_class_uid=request.AffectedSOPClassUID or "",
                sop_instance_uid=request.AffectedSOPInstanceUID or "",
            )
            # Admitted at association time; read again because a store does not carry it along.
            profile_name = self.allowlist.admit(calling_ae, host)
            pass_through_to = self._pass_through(header.sop_class_uid, profile_name)
            if not pass_through_to:
                check_image(ds, transfer_syntax)
            del ds  # frees the parsed copy of the pixels: the spool gets the bytes as received
            job_id = self._accept(
                header,
                data,
                profile_name,
                calling_ae=calling_ae,
                called_ae=_primitive(requestor.primitive, "requestor").called_ae_title.strip(),
                peer_host=host,
                transfer_syntax_uid=transfer_syntax,
                pass_through_to=pass_through_to,
            )
        except Exception as exc:
            code, comment = store_failure_status(exc)
            if isinstance(exc, NodeError):  # foreseen: the reason is the message, no traceback
                log.warning(
                    "C-STORE %s from %s@%s refused 0x%04X: %s",
                    request.AffectedSOPInstanceUID,
                    calling_ae,
                    host,
                    code,
                    exc,
                )
            else:
                log.exception(
                    "C-STORE %s from %s@%s failed 0x%04X: the image is not safe",
                    request.AffectedSOPInstanceUID,
                    calling_ae,
                    host,
                    code,
                )
            counters.store_requests.labels(status=counters.status_class(code)).inc()
            return _status(code, comment)
        counters.store_requests.labels(status="success").inc()
        elapsed_ms = (time.perf_counter() - started) * 1e3
        if job_id is None:
            log.info(
                "C-STORE %s from %s@%s: identical duplicate, no new job (%.1f ms)",
                header.sop_instance_uid,
                calling_ae,
                host,
                elapsed_ms,
            )
        else:
            log.info(
                "C-STORE %s from %s@%s: job %d, %d bytes, %.1f ms%s",
                header.sop_instance_uid,
                calling_ae,
                host,
                job_id,
                len(data),
                elapsed_ms,
                self._patient(data) if self.config.audit.log_patient_data else "",
            )
        return SUCCESS

    @staticmethod
    def _patient(data: bytes) -> str:
        """ ", patient ID (name)": only with [audit] log_patient_data, for debugging."""
        ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=["PatientID", "PatientName"])
        return f", patient {ds.get('PatientID', '')} ({ds.get('PatientName', '')})"

    def _pass_through(self, sop_class_uid: str, profile_name: str) -> list[str]:
        """The destinations an image of a class the node does not restore goes to unchanged (its
        profile's `pass_through`); raises 0x0122 when its profile does not pass that class."""
        if sop_class_uid in STORAGE_SOP_CLASSES:
            return []
        profile = self.config.profiles.get(profile_name)
        if profile is None or sop_class_uid not in profile.pass_through:
            raise NotUnderstood(
                SOP_CLASS_NOT_SUPPORTED,
                f"{sop_class_uid}: not passed by profile {profile_name}",
            )
        return list(profile.destinations)

    def _accept(
        self,
        header: Header,
        data: bytes,
        profile_name: str,
        *,
        calling_ae: str,
        called_ae: str,
        peer_host: str,
        transfer_syntax_uid: str,
        pass_through_to: list[str],
    ) -> int | None:
        """Spool and record one image; the job id, or None for an identical duplicate.

        Raises on any spool or job-log failure, leaving no spooled file behind.
        """
        sha256 = hashlib.sha256(data).hexdigest()
        with self._uid_locks[hash(header.sop_instance_uid) % len(self._uid_locks)]:
            if self._is_identical_duplicate(header.sop_instance_uid, sha256):
                return None
            path = self.spool.store(data, header.study_instance_uid, header.sop_instance_uid, sha256)
            try:
                return self.sink.record_received(
                    sop_instance_uid=header.sop_instance_uid,
                    study_instance_uid=header.study_instance_uid,
                    series_instance_uid=header.series_instance_uid,
                    sop_class_uid=header.sop_class_uid,
                    transfer_syntax_uid=transfer_syntax_uid,
                    calling_ae=calling_ae,
                    called_ae=called_ae,
                    peer_host=peer_host,
                    station_name=header.station_name,
                    detector_serial=header.detector_serial,
                    profile=profile_name,
                    input_path=str(path),
                    input_sha256=sha256,
                    input_bytes=len(data),
                    pass_through_to=pass_through_to,
                    patient_id=header.patient_id,
                )
            except BaseException:
                self.spool.discard(path)
                raise

    def _is_identical_duplicate(self, sop_instance_uid: str, sha256: str) -> bool:
        """ignore-identical: the same bytes already have a live job (not failed or cancelled)."""
        if self.config.node.duplicate_policy != "ignore-identical":
            return False
        return any(
            job.input_sha256 == sha256 and _status_name(job.status) not in ("failed", "cancelled")
            for job in self.sink.find_by_sop_instance(sop_instance_uid)
        )
