"""The audit trail: what it records (associations, images in and out, commands, configuration),
the PS3.15 audit messages made of it, their RFC 5424 syslog transport (UDP, TCP, TLS) to a real
collector socket, and an application log free of patient data unless switched on."""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import socket
import ssl
import subprocess
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from dicom_node.audit import SyslogShipper, audit_message, record_config_loaded
from dicom_node.audit.atna import EVENTS
from dicom_node.cli import main
from dicom_node.config import ConfigurationError, SyslogSettings, load_config, parse_config
from dicom_node.imaging import raw_mammogram_dataset, save_dataset
from dicom_node.joblog import AuditSnapshot, JobLog
from dicom_node.receive import StorageSCP

from peers import free_port, storescu, wait_until

PATIENT_ID, PATIENT_NAME = "PID-4711", "DOE^JANE"


@pytest.fixture
def joblog(tmp_path: Path) -> Iterator[JobLog]:
    log = JobLog(f"sqlite:///{tmp_path / 'joblog.sqlite'}")
    yield log
    log.close()


def received(log: JobLog, uid: str = "1.2.3.4", patient_id: str | None = PATIENT_ID) -> int:
    return log.record_received(
        sop_instance_uid=uid,
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2.1",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        calling_ae="MAMMO1",
        called_ae="DOSENODE",
        peer_host="127.0.0.1",
        station_name="ROOM1",
        detector_serial="SIM-0001",
        profile="half",
        input_path="/spool/x.dcm",
        input_sha256="0" * 64,
        input_bytes=10,
        pass_through_to=("pacs",),
        patient_id=patient_id,
    )


def trail(log: JobLog) -> list[AuditSnapshot]:
    return list(reversed(log.audit_events()))


# What the job log records


def test_an_image_in_and_each_send_out_are_in_the_trail_with_their_outcome(joblog: JobLog) -> None:
    job_id = received(joblog)
    send = joblog.claim_delivery("forwarder-1", lease_s=60)
    assert send is not None
    joblog.delivery_failed(send.id, error="PACS busy", status=0xA700, retry_at=datetime.now(UTC) + timedelta(hours=1))
    joblog.retry(job_id, actor="cli alice")
    send = joblog.claim_delivery("forwarder-1", lease_s=60)
    assert send is not None
    joblog.delivery_sent(send.id, status=0, send_s=0.1)

    lines = trail(joblog)
    assert [(line.event, line.outcome) for line in lines] == [
        ("instance-received", 0),
        ("instance-sent", 4),  # will be retried: a minor failure
        ("job-retried", 0),
        ("instance-sent", 0),
    ]
    arrival, failed, retried, sent = lines
    assert (arrival.actor, arrival.address, arrival.job_id) == ("MAMMO1", "127.0.0.1", job_id)
    assert arrival.detail["sop_instance_uid"] == "1.2.3.4" and arrival.detail["patient_id"] == PATIENT_ID
    assert failed.detail["destination"] == "pacs" and failed.detail["error"] == "PACS busy"
    assert failed.detail["status"] == 0xA700
    assert retried.actor == "cli alice" and "due now" in retried.detail["change"]
    assert sent.detail["patient_id"] == PATIENT_ID  # an ATNA record names the patient whose image moved
    assert sent.detail["kind"] == "original" and sent.detail["sop_instance_uid"] == "1.2.3.4"


def test_a_send_given_up_is_a_serious_failure(joblog: JobLog) -> None:
    received(joblog)
    send = joblog.claim_delivery("forwarder-1", lease_s=60)
    assert send is not None
    joblog.delivery_failed(send.id, error="rejected: 0xC000", status=0xC000, retry_at=None)
    assert (trail(joblog)[-1].event, trail(joblog)[-1].outcome) == ("instance-sent", 8)


def test_commands_are_audited_with_who_ran_them_and_refusals_change_nothing(joblog: JobLog) -> None:
    job_id = received(joblog)
    assert joblog.cancel(job_id, actor="dashboard bob")
    assert not joblog.cancel(job_id, actor="dashboard bob")  # nothing changed: nothing audited
    assert joblog.retry(job_id, actor="cli carol")
    events = [(line.event, line.actor) for line in trail(joblog)]
    assert events[1:] == [("job-cancelled", "dashboard bob"), ("job-retried", "cli carol")]
    history = [(event.kind, event.actor) for event in joblog.events(job_id)]
    assert ("cancel", "dashboard bob") in history and ("retry", "cli carol") in history


def test_the_cli_names_the_user_who_ran_a_command(tmp_path: Path, capsys) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n')
    log = JobLog(load_config(config).database_url)
    job_id = received(log)
    with pytest.raises(SystemExit) as exit_info:
        main(["cancel", str(job_id), "--config", str(config)])
    assert exit_info.value.code == 0, capsys.readouterr().err
    assert trail(log)[-1].actor == f"cli {getpass.getuser()}"
    log.close()


def test_the_configuration_s_digest_is_the_file_s_sha256(tmp_path: Path, joblog: JobLog) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[node]\nae_title = "AUDITED"\n')
    config = load_config(path)
    record_config_loaded(config, joblog, "serve")
    line = trail(joblog)[-1]
    assert line.event == "config-loaded" and line.actor.startswith("serve ")
    assert line.detail["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert line.detail["file"] == str(path.resolve())
    assert load_config(None).digest  # the embedded defaults have one too
    path.write_text('[node]\nae_title = "CHANGED"\n')
    assert load_config(path).digest != line.detail["sha256"]


# The receiver's part


@pytest.fixture
def scp(tmp_path: Path, joblog: JobLog, request) -> Iterator[StorageSCP]:
    log_patient_data = getattr(request, "param", False)
    config = parse_config(
        {
            "node": {"ae_title": "DOSENODE", "bind": "127.0.0.1", "data_dir": str(tmp_path), "min_free_disk_mb": 0},
            "sources": [{"ae_title": "MAMMO1", "profile": "half"}],
            "profiles": {"half": {"pipeline": "gat-bm3d", "dose_fraction": 0.5}},
            "audit": {"log_patient_data": log_patient_data},
        }
    )
    server = StorageSCP(config, joblog, port=0)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def mammogram(folder: Path) -> Path:
    ds = raw_mammogram_dataset(np.full((96, 80), 900, np.uint16), seed=3)
    ds.PatientID, ds.PatientName = PATIENT_ID, PATIENT_NAME
    path = folder / "mg.dcm"
    save_dataset(ds, path)
    return path


def test_associations_accepted_and_rejected_are_audited_with_the_reason(
    scp: StorageSCP, joblog: JobLog, tmp_path: Path
) -> None:
    path = mammogram(tmp_path)
    assert storescu(scp.port, path, calling="MAMMO1").returncode == 0
    assert storescu(scp.port, path, calling="STRANGER").returncode != 0
    wait_until(lambda: len(trail(joblog)) >= 3, timeout=10, message=lambda: f"trail: {trail(joblog)}")
    lines = {line.event: line for line in trail(joblog)}
    accepted, rejected = lines["association-accepted"], lines["association-rejected"]
    assert (accepted.actor, accepted.address, accepted.outcome) == ("MAMMO1", "127.0.0.1", 0)
    assert (rejected.actor, rejected.address, rejected.outcome) == ("STRANGER", "127.0.0.1", 8)
    assert "calling AE" in rejected.detail["reason"]
    assert lines["instance-received"].detail["patient_id"] == PATIENT_ID


@pytest.mark.parametrize("scp", [False, True], indirect=True, ids=["default", "log_patient_data"])
def test_patient_data_stays_out_of_the_application_log_unless_switched_on(
    scp: StorageSCP, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="dicom_node")
    assert storescu(scp.port, mammogram(tmp_path)).returncode == 0
    wait_until(lambda: "C-STORE" in caplog.text, timeout=10, message="the store was not logged")
    switched_on = scp.config.audit.log_patient_data
    assert (PATIENT_ID in caplog.text) == switched_on
    assert ("DOE^JANE" in caplog.text) == switched_on
    assert "job 1" in caplog.text  # the log still names the image by job (and UID)


# The PS3.15 messages


def message(line: AuditSnapshot) -> ET.Element:
    return ET.fromstring(audit_message(line, source_id="NODE-A", node_ae="DOSENODE"))


def code(element: ET.Element | None) -> str | None:
    return None if element is None else element.get("csd-code")


@pytest.mark.parametrize(
    ("event", "event_id", "action", "type_code"),
    [
        ("association-accepted", "110113", "E", "110126"),
        ("association-rejected", "110113", "E", "110126"),
        ("instance-received", "110104", "C", None),
        ("instance-sent", "110104", "R", None),
        ("job-cancelled", "110103", "U", None),
        ("config-loaded", "110113", "E", "110131"),
    ],
)
def test_each_event_is_the_ps3_15_message_of_its_kind(event, event_id, action, type_code) -> None:
    detail = {
        "instance-received": {"sop_class_uid": "1.2", "sop_instance_uid": "1.2.3", "study_instance_uid": "1.2.9"},
        "instance-sent": {"destination": "pacs", "sop_instance_uid": "1.2.3", "study_instance_uid": "1.2.9"},
        "job-cancelled": {"change": "cancelled", "study_instance_uid": "1.2.9", "patient_id": PATIENT_ID},
        "association-rejected": {"reason": "calling AE 'X' not recognised"},
        "config-loaded": {"file": "/etc/node.toml", "sha256": "ab" * 32},
    }.get(event, {})
    line = AuditSnapshot(1, datetime(2026, 12, 1, tzinfo=UTC), event, 0, "MAMMO1", "10.0.0.5", 7, detail, None)
    root = message(line)
    identification = root.find("EventIdentification")
    assert identification is not None
    assert identification.get("EventActionCode") == action and identification.get("EventOutcomeIndicator") == "0"
    assert code(identification.find("EventID")) == event_id
    assert code(identification.find("EventTypeCode")) == type_code
    assert [child.tag for child in root][:1] == ["EventIdentification"]
    participants = root.findall("ActiveParticipant")
    assert len(participants) == 2 and sum(p.get("UserIsRequestor") == "true" for p in participants) == 1
    assert root.find("AuditSourceIdentification").get("AuditSourceID") == "NODE-A"  # type: ignore[union-attr]
    objects = {code(o.find("ParticipantObjectIDTypeCode")): o for o in root.findall("ParticipantObjectIdentification")}
    if "study_instance_uid" in detail:
        assert objects["110180"].get("ParticipantObjectID") == "1.2.9"
    if "sop_instance_uid" in detail:
        assert objects["110180"].find("SOPClass/Instance").get("UID") == "1.2.3"  # type: ignore[union-attr]
    assert ("2" in objects) == ("patient_id" in detail)
    if event == "association-rejected":
        assert identification.findtext("EventOutcomeDescription") == detail["reason"]
        requestor = next(p for p in participants if p.get("UserIsRequestor") == "true")
        assert (requestor.get("UserID"), requestor.get("NetworkAccessPointID")) == ("MAMMO1", "10.0.0.5")
        assert requestor.get("NetworkAccessPointTypeCode") == "2"  # an IP address


def test_every_event_the_job_log_writes_has_a_message() -> None:
    source = Path(__file__).resolve().parents[1] / "dicom_node"
    written = {
        "association-accepted",
        "association-rejected",
        "instance-received",
        "instance-sent",
        "config-loaded",
        "job-retried",
        "job-cancelled",
        "job-resent",
        "job-released",
        "job-reprocessed",
    }
    text = "".join(path.read_text() for path in source.rglob("*.py"))
    for event in written:
        assert f'"{event}"' in text
    assert set(EVENTS) == written


# Syslog to a collector


class Collector:
    """A syslog collector on a free loopback port: UDP datagrams, or TCP/TLS octet-counted frames."""

    def __init__(self, protocol: str, certificate: tuple[Path, Path] | None = None):
        self.protocol, self.frames, self.refused = protocol, [], []
        family = socket.SOCK_DGRAM if protocol == "udp" else socket.SOCK_STREAM
        self.sock = socket.socket(socket.AF_INET, family)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.context = None
        if certificate is not None:
            self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.context.load_cert_chain(*map(str, certificate))
        if protocol != "udp":
            self.sock.listen()
        self.sock.settimeout(0.2)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                if self.protocol == "udp":
                    self.frames.append(self.sock.recvfrom(65535)[0])
                    continue
                connection, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            connection.settimeout(5)
            if self.context is not None:
                try:
                    connection = self.context.wrap_socket(connection, server_side=True)
                except ssl.SSLError as exc:  # e.g. the client does not trust this certificate
                    self.refused.append(exc)
                    connection.close()
                    continue
            data = b""
            with connection:
                while chunk := connection.recv(65536):
                    data += chunk
            while data:  # "LENGTH SP FRAME" …
                length, _, rest = data.partition(b" ")
                self.frames.append(rest[: int(length)])
                data = rest[int(length) :]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA), made with openssl."""
    key, cert = tmp_path / "collector.key", tmp_path / "collector.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=collector"]
        + ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def parse_frame(frame: bytes) -> tuple[str, str]:
    """(RFC 5424 header, XML) of one frame; the MSG starts with a UTF-8 BOM."""
    header, bom, xml = frame.partition(b"\xef\xbb\xbf")
    assert bom, "no BOM before the message"
    return header.decode(), xml.decode()


@pytest.mark.parametrize("protocol", ["udp", "tcp", "tls"])
def test_lines_reach_the_collector_as_rfc5424_audit_messages_once(
    protocol: str, joblog: JobLog, certificate: tuple[Path, Path]
) -> None:
    collector = Collector(protocol, certificate if protocol == "tls" else None)
    try:
        job_id = received(joblog)
        joblog.cancel(job_id, actor="cli alice")
        settings = SyslogSettings(host="127.0.0.1", port=collector.port, protocol=protocol, timeout_s=5)
        shipper = SyslogShipper(settings, source_id="NODE-A", node_ae="DOSENODE", ca=certificate[0])
        assert shipper.ship(joblog) == 2
        assert shipper.ship(joblog) == 0  # shipped lines are not sent again
        wait_until(lambda: len(collector.frames) == 2, timeout=10, message=lambda: f"frames: {collector.frames}")
    finally:
        collector.close()
    headers, messages = zip(*map(parse_frame, collector.frames), strict=True)
    # <PRI>1 TIMESTAMP HOST APP PROCID MSGID SD: authpriv (10) × 8 + notice (5)
    assert all(header.startswith("<85>1 ") and " dicom-node " in header for header in headers)
    assert all(header.split(" ")[5] == "IHE+RFC-3881" and header.endswith(" - ") for header in headers)
    events = [code(ET.fromstring(xml).find("EventIdentification/EventID")) for xml in messages]
    assert events == ["110104", "110103"]
    assert all(line.shipped_at is not None for line in joblog.audit_events())


def test_an_untrusted_collector_certificate_sends_nothing(joblog: JobLog, certificate, tmp_path: Path) -> None:
    collector = Collector("tls", certificate)
    try:
        received(joblog)
        settings = SyslogSettings(host="127.0.0.1", port=collector.port, protocol="tls", timeout_s=5)
        shipper = SyslogShipper(settings, source_id="NODE-A", node_ae="DOSENODE", ca=None)  # the system's CAs
        assert shipper.ship(joblog) == 0
    finally:
        collector.close()
    assert collector.frames == [] and joblog.audit_events()[0].shipped_at is None
    assert "unknown ca" in str(collector.refused[0]).lower()  # the shipper refused the certificate


def test_a_collector_that_is_down_loses_nothing(joblog: JobLog, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dicom_node.audit")
    port = free_port()
    settings = SyslogSettings(host="127.0.0.1", port=port, protocol="tcp", timeout_s=2)
    shipper = SyslogShipper(settings, source_id="NODE-A", node_ae="DOSENODE")
    received(joblog)
    assert shipper.ship(joblog) == 0 and shipper.ship(joblog) == 0
    assert caplog.text.count("unreachable") == 1  # once per outage
    assert joblog.audit_events()[0].shipped_at is None
    collector = Collector("tcp")
    try:
        shipper.settings = SyslogSettings(host="127.0.0.1", port=collector.port, protocol="tcp", timeout_s=2)
        assert shipper.ship(joblog) == 1
        wait_until(lambda: collector.frames, timeout=10)
    finally:
        collector.close()
    assert "answers again" in caplog.text


def test_syslog_settings_default_to_tls_on_6514_and_refuse_unknown_keys() -> None:
    assert SyslogSettings(host="audit.example").resolved_port == 6514
    assert SyslogSettings(host="audit.example", protocol="udp").resolved_port == 514
    with pytest.raises(ConfigurationError, match=r"audit\.syslog\.protocol"):
        parse_config({"audit": {"syslog": {"host": "a", "protocol": "smtp"}}})
    with pytest.raises(ConfigurationError, match=r"audit\.syslog\.host"):
        parse_config({"audit": {"syslog": {"host": ""}}})


# The command


def test_the_audit_command_lists_the_trail_as_text_and_strict_json(tmp_path: Path, capsys) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n')
    log = JobLog(load_config(config).database_url)
    job_id = received(log)
    log.cancel(job_id, actor="cli alice")
    log.close()

    def run(*args: str) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as info:
            main(["audit", "--config", str(config), *args])
        out, err = capsys.readouterr()
        return info.value.code, out, err

    code_, out, _ = run()
    assert code_ == 0 and "job-cancelled" in out and "cli alice" in out and "MAMMO1@127.0.0.1" in out
    code_, out, _ = run("--json", "--event", "instance-received")
    lines = json.loads(out, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
    assert code_ == 0 and [line["event"] for line in lines] == ["instance-received"]
    code_, _, err = run("--event", "nonsense")
    assert code_ != 0 and "--event" in err and "Traceback" not in err
