"""One audit-trail line as a DICOM audit message (PS3.15 A.5, the IHE ATNA schema).

| event                  | EventID                          | action | EventTypeCode                 |
|------------------------|----------------------------------|--------|-------------------------------|
| association-accepted   | 110113 Security Alert            | E      | 110126 Node Authentication    |
| association-rejected   | 110113 Security Alert            | E      | 110126 Node Authentication    |
| instance-received      | 110104 DICOM Instances Transferred | C    | —                             |
| instance-sent          | 110104 DICOM Instances Transferred | R    | —                             |
| job-retried, -cancelled, -resent, -released, -reprocessed | 110103 DICOM Instances Accessed | U | — |
| config-loaded          | 110113 Security Alert            | E      | 110131 Software Configuration |
"""

from __future__ import annotations

import base64
import ipaddress
import os
import xml.etree.ElementTree as ET
from typing import Any

from dicom_node.joblog import AuditSnapshot

Code = tuple[str, str, str]  # csd-code, codeSystemName, originalText

SECURITY_ALERT: Code = ("110113", "DCM", "Security Alert")
INSTANCES_TRANSFERRED: Code = ("110104", "DCM", "DICOM Instances Transferred")
INSTANCES_ACCESSED: Code = ("110103", "DCM", "DICOM Instances Accessed")
NODE_AUTHENTICATION: Code = ("110126", "DCM", "Node Authentication")
SOFTWARE_CONFIGURATION: Code = ("110131", "DCM", "Software Configuration")
STATION_AE_TITLE: Code = ("110119", "DCM", "Station AE Title")
SOURCE_ROLE: Code = ("110153", "DCM", "Source Role ID")
DESTINATION_ROLE: Code = ("110152", "DCM", "Destination Role ID")
PERSON_ID: Code = ("113871", "DCM", "Person ID")
STUDY_INSTANCE_UID: Code = ("110180", "DCM", "Study Instance UID")
PATIENT_NUMBER: Code = ("2", "RFC-3881", "Patient Number")
DEVICE_NAME: Code = ("113877", "DCM", "Device Name")

EVENTS: dict[str, tuple[Code, str, Code | None]] = {
    "association-accepted": (SECURITY_ALERT, "E", NODE_AUTHENTICATION),
    "association-rejected": (SECURITY_ALERT, "E", NODE_AUTHENTICATION),
    "instance-received": (INSTANCES_TRANSFERRED, "C", None),
    "instance-sent": (INSTANCES_TRANSFERRED, "R", None),
    "job-retried": (INSTANCES_ACCESSED, "U", None),
    "job-cancelled": (INSTANCES_ACCESSED, "U", None),
    "job-resent": (INSTANCES_ACCESSED, "U", None),
    "job-released": (INSTANCES_ACCESSED, "U", None),
    "job-reprocessed": (INSTANCES_ACCESSED, "U", None),
    "config-loaded": (SECURITY_ALERT, "E", SOFTWARE_CONFIGURATION),
}


def audit_message(event: AuditSnapshot, *, source_id: str, node_ae: str) -> str:
    """The XML of one audit line; `source_id` names the node to the collector (AuditSourceID)."""
    event_id, action, type_code = EVENTS[event.event]
    detail = event.detail
    root = ET.Element("AuditMessage")
    identification = ET.SubElement(
        root,
        "EventIdentification",
        EventActionCode=action,
        EventDateTime=event.at.isoformat(timespec="milliseconds"),
        EventOutcomeIndicator=str(event.outcome),
    )
    _code(identification, "EventID", event_id)
    if type_code:
        _code(identification, "EventTypeCode", type_code)
    why = detail.get("reason") or detail.get("error")
    if why:
        ET.SubElement(identification, "EventOutcomeDescription").text = str(why)

    node = {"AlternativeUserID": str(os.getpid()), "UserTypeCode": "2"}  # this process, an application
    if event.event.startswith("association-"):
        _participant(root, event.actor, STATION_AE_TITLE, requestor=True, address=event.address, UserTypeCode="2")
        _participant(root, node_ae, STATION_AE_TITLE, requestor=False, **node)
    elif event.event == "instance-received":
        _participant(root, event.actor, SOURCE_ROLE, requestor=True, address=event.address, UserTypeCode="2")
        _participant(root, node_ae, DESTINATION_ROLE, requestor=False, **node)
    elif event.event == "instance-sent":
        _participant(root, node_ae, SOURCE_ROLE, requestor=True, **node)
        _participant(root, str(detail.get("destination", "")), DESTINATION_ROLE, requestor=False, UserTypeCode="2")
    else:  # a person's command (job-…), or a person starting the node (config-loaded)
        person = event.actor.split(" ", 1)[-1]  # "cli alice", "dashboard bob", "serve root": the person
        _participant(root, person, PERSON_ID, requestor=True, UserTypeCode="1", AlternativeUserID=event.actor)
        _participant(root, node_ae, DEVICE_NAME, requestor=False, **node)

    source = ET.SubElement(root, "AuditSourceIdentification", AuditSourceID=source_id)
    ET.SubElement(source, "AuditSourceTypeCode", {"csd-code": "4"})  # application server process

    if "study_instance_uid" in detail:
        _study(root, detail)
    if detail.get("patient_id"):
        patient = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            ParticipantObjectID=str(detail["patient_id"]),
            ParticipantObjectTypeCode="1",
            ParticipantObjectTypeCodeRole="1",
        )
        _code(patient, "ParticipantObjectIDTypeCode", PATIENT_NUMBER)
    if event.event == "config-loaded":
        configuration = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            ParticipantObjectID=str(detail.get("file", "embedded defaults")),
            ParticipantObjectTypeCode="2",
        )
        _code(configuration, "ParticipantObjectIDTypeCode", DEVICE_NAME)
        _object_detail(configuration, "SHA-256", detail.get("sha256", ""))
    return ET.tostring(root, encoding="unicode", xml_declaration=False)


def _code(parent: ET.Element, tag: str, code: Code) -> None:
    ET.SubElement(parent, tag, {"csd-code": code[0], "codeSystemName": code[1], "originalText": code[2]})


def _participant(
    root: ET.Element,
    user_id: str,
    code: Code,
    *,
    requestor: bool,
    address: str | None = None,
    **attributes: str,
) -> None:
    """An ActiveParticipant; `attributes` are the schema's own (AlternativeUserID, UserTypeCode)."""
    attributes = {"UserID": user_id, **attributes, "UserIsRequestor": "true" if requestor else "false"}
    if address:
        attributes["NetworkAccessPointID"] = address
        attributes["NetworkAccessPointTypeCode"] = "2" if _is_ip(address) else "1"
    element = ET.SubElement(root, "ActiveParticipant", attributes)
    _code(element, "RoleIDCode" if code in (SOURCE_ROLE, DESTINATION_ROLE) else "UserIDTypeCode", code)


def _study(root: ET.Element, detail: dict[str, Any]) -> None:
    study = ET.SubElement(
        root,
        "ParticipantObjectIdentification",
        ParticipantObjectID=str(detail["study_instance_uid"]),
        ParticipantObjectTypeCode="2",
        ParticipantObjectTypeCodeRole="3",
    )
    _code(study, "ParticipantObjectIDTypeCode", STUDY_INSTANCE_UID)
    if "change" in detail:
        _object_detail(study, "Change", detail["change"])
    if "sop_instance_uid" in detail:  # PS3.15's schema: SOPClass right under the object, Instance inside
        sop_class = ET.SubElement(study, "SOPClass", UID=str(detail.get("sop_class_uid", "")), NumberOfInstances="1")
        ET.SubElement(sop_class, "Instance", UID=str(detail["sop_instance_uid"]))


def _object_detail(parent: ET.Element, kind: str, value: str) -> None:
    """ParticipantObjectDetail values are base64 in the schema (xs:base64Binary)."""
    ET.SubElement(parent, "ParticipantObjectDetail", type=kind, value=base64.b64encode(value.encode()).decode())


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True
