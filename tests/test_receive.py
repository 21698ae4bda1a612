"""The Storage SCP against real peers: DCMTK storescu/echoscu as the modality, pynetdicom for bad data.

Every SCP listens on a free loopback port and is stopped by the `serve` fixture; the job log is an
in-memory fake sink (the real JobLog is tested in its own file), switchable to "database down".
"""

from __future__ import annotations

import enum
import hashlib
import logging
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.dsutils import encode, split_dataset

from dicom_node.config import Config, parse_config
from dicom_node.imaging import (
    LOSSLESS_TRANSFER_SYNTAXES,
    MG_FOR_PRESENTATION,
    MG_FOR_PROCESSING,
    acquisition_params,
    raw_mammogram_dataset,
    save_dataset,
)
from dicom_node.receive import AllowList, Refused, Spool, StorageSCP
from dicom_node.receive.allowlist import CALLING_AE_NOT_RECOGNISED
from dicom_node.receive.scp import NotUnderstood, check_image, read_header

from dicomtools import dcmtk_convert, gdcmconv, require_tool
from peers import storescu as run_storescu
from peers import wait_until

NODE = "DOSENODE"
VERIFICATION = "1.2.840.10008.1.1"


class JobState(enum.Enum):
    """A plain Enum (not str): the SCP must read a job status by its value."""

    received = "received"
    failed = "failed"


@dataclass
class FakeJob:
    id: int
    fields: dict[str, Any]
    status: JobState = JobState.received

    @property
    def input_sha256(self) -> str:
        return self.fields["input_sha256"]


@dataclass
class MemorySink:
    """The part of JobLog the receiver uses, in memory; `down` makes every call fail like an unreachable database."""

    jobs: list[FakeJob] = field(default_factory=list)
    audit_lines: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    down: bool = False

    def _check(self) -> None:
        if self.down:
            raise ConnectionError("database is down")

    def record_received(self, **fields: Any) -> int:
        self._check()
        self.jobs.append(FakeJob(len(self.jobs) + 1, fields))
        return len(self.jobs)

    def find_by_sop_instance(self, uid: str) -> list[FakeJob]:
        self._check()
        return [job for job in self.jobs if job.fields["sop_instance_uid"] == uid]

    def audit(self, event: str, **fields: Any) -> None:
        self._check()
        self.audit_lines.append((event, fields))


@pytest.fixture(autouse=True)
def send_files_as_they_are(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom SCU sends a file's bytes without decoding them, as a modality would (and bad data can be sent)."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def make_config(data_dir: Path, *, sources: list[dict] | None = None, **node: Any) -> Config:
    return parse_config(
        {
            "node": {"ae_title": NODE, "bind": "127.0.0.1", "data_dir": str(data_dir), "min_free_disk_mb": 0, **node},
            "sources": [{"ae_title": "MAMMO1", "profile": "half"}, {"ae_title": "MAMMO2", "profile": "deep"}]
            if sources is None
            else sources,
            "profiles": {
                "half": {"pipeline": "gat-bm3d", "dose_fraction": 0.5},
                "deep": {"pipeline": "deep", "model": "unet-v3", "dose_fraction": 0.25},
            },
        }
    )


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., tuple[StorageSCP, MemorySink]]]:
    """Start SCPs on free loopback ports; each one is stopped when the test ends, pass or fail."""
    running: list[StorageSCP] = []

    def start(config: Config | None = None, sink: MemorySink | None = None) -> tuple[StorageSCP, MemorySink]:
        sink = sink or MemorySink()
        scp = StorageSCP(config or make_config(tmp_path / "node"), sink, port=0)
        running.append(scp)
        scp.start()
        return scp, sink

    try:
        yield start
    finally:
        for scp in running:
            scp.stop()


def mammogram(folder: Path, seed: int, shape: tuple[int, int] = (96, 80)) -> tuple[Path, Dataset]:
    pixels = np.random.default_rng(seed).integers(40, 1 << 14, shape, dtype=np.uint16)
    ds = raw_mammogram_dataset(pixels, seed=seed)
    path = folder / f"mg-{seed}.dcm"
    save_dataset(ds, path)
    return path, ds


def storescu(
    port: int, path: Path, *options: str, calling: str = "MAMMO1", called: str = NODE
) -> subprocess.CompletedProcess:
    """peers.storescu, verbose (the tests read the association's details) and printed."""
    result = run_storescu(port, path, calling=calling, called=called, options=("-v", *options))
    print(f"storescu exit {result.returncode}: {result.stdout}{result.stderr}".strip())
    return result


def stored_ok(result: subprocess.CompletedProcess) -> bool:
    return result.returncode == 0 and "Received Store Response (Success)" in result.stdout + result.stderr


def store_response(result: subprocess.CompletedProcess) -> tuple[int, str | None]:
    """The DIMSE status and Error Comment of the one C-STORE response in `storescu -d`'s output."""
    output = result.stdout + result.stderr
    status = re.search(r"DIMSE Status\s*: 0x([0-9a-f]{4})", output)
    assert status, "storescu received no C-STORE response"
    comment = re.search(r"\(0000,0902\) LO \[(.*)\]", output)
    return int(status.group(1), 16), comment.group(1) if comment else None


def spooled_files(scp: StorageSCP) -> list[Path]:
    return sorted(p for p in scp.spool.root.rglob("*") if p.is_file())


def body(path: Path) -> bytes:
    """The dataset bytes after the file meta information, exactly as stored."""
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def send_with_pynetdicom(port: int, path: Path, calling: str = "MAMMO1") -> Dataset:
    """C-STORE a file's bytes as they are (pynetdicom never decodes them) and return the status."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(MG_FOR_PROCESSING, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE)
    assert assoc.is_established
    try:
        return assoc.send_c_store(path)
    finally:
        assoc.release()


def file_with_body(path: Path, dataset_bytes: bytes, sop_instance_uid: str = "1.2.3.4") -> Path:
    """A Part 10 file with valid file meta and whatever dataset bytes follow it."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MG_FOR_PROCESSING
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with path.open("wb") as file:
        file.write(b"\0" * 128 + b"DICM")
        pydicom.filewriter.write_file_meta_info(pydicom.filebase.DicomFileLike(file), meta)
        file.write(dataset_bytes)
    return path


# Contract and wiring


def test_receive_imports_no_restoration_code() -> None:
    """The modality is answered in milliseconds: no torch, scipy or restorer on the receive path."""
    probe = (
        "import sys, dicom_node.receive; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'scipy', 'bm3d') "
        "or m.startswith('dicom_node.restore.') and m != 'dicom_node.restore.noise' "
        "or m in ('dicom_node.pipeline.processing', 'dicom_node.sim')))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_port_is_known_only_while_running(tmp_path: Path) -> None:
    scp = StorageSCP(make_config(tmp_path / "node"), MemorySink(), port=0)
    with pytest.raises(RuntimeError):
        _ = scp.port
    with scp:
        assert scp.port > 0
    with pytest.raises(RuntimeError):
        _ = scp.port


def test_accepted_contexts_are_mg_for_processing_in_the_lossless_syntaxes_and_verification(serve) -> None:
    """For Presentation (or any class the node cannot restore) is no context of the node's: refused at negotiation."""
    scp, _ = serve()
    contexts = {cx.abstract_syntax: set(cx.transfer_syntax) for cx in scp._server.ae.supported_contexts}
    assert set(contexts) == {MG_FOR_PROCESSING, VERIFICATION}
    assert contexts[MG_FOR_PROCESSING] == set(LOSSLESS_TRANSFER_SYNTAXES)
    assert scp._server.ae.maximum_pdu_size == 0


@pytest.mark.parametrize(
    ("device_serial", "detector_id", "named"),
    [("SN-1", "DET-9", "SN-1"), (None, "DET-9", "DET-9"), ("SN-1", None, "SN-1"), (None, None, None)],
)
def test_the_job_names_the_detector_as_the_worker_looks_it_up(
    device_serial: str | None, detector_id: str | None, named: str | None
) -> None:
    """Device Serial Number, else Detector ID: the entry the worker's noise lookup uses (acquisition_params)."""
    ds = raw_mammogram_dataset(np.full((8, 8), 500, np.uint16), seed=1)
    for keyword, value in (("DeviceSerialNumber", device_serial), ("DetectorID", detector_id)):
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    header = read_header(
        ds, context_sop_class_uid=MG_FOR_PROCESSING, sop_class_uid=MG_FOR_PROCESSING, sop_instance_uid=ds.SOPInstanceUID
    )
    assert header.detector_serial == acquisition_params(ds).detector_serial == named


def test_a_pixel_attribute_pydicom_cannot_convert_is_not_understood() -> None:
    """Not a bug of the node's (0xA700, "send again"): the dataset is wrong, and saying so is 0xC000."""
    ds = raw_mammogram_dataset(np.full((8, 8), 500, np.uint16), seed=1)
    ds[0x00280010] = RawDataElement(Tag(0x00280010), "US", 3, b"\x08\x00\x00", 0, False, True)  # Rows, 3 bytes
    with pytest.raises(NotUnderstood) as refused:
        check_image(ds, ExplicitVRLittleEndian)
    assert (refused.value.status, str(refused.value)) == (0xC000, "unreadable pixel description: BytesLengthException")


def test_allowlist_matches_ae_and_network() -> None:
    config = make_config(
        Path("unused"),
        sources=[
            {"ae_title": "UNIT", "hosts": ["10.1.0.0/16"], "profile": "half"},
            {"ae_title": "UNIT", "hosts": ["10.2.0.7"], "profile": "deep"},
        ],
    )
    allow = AllowList(config)
    assert allow.admit("UNIT", "10.1.200.3") == "half"
    assert allow.admit("UNIT  ", "::ffff:10.2.0.7") == "deep"  # dual-stack peers and padded AE titles
    assert AllowList(make_config(Path("unused"), sources=[])).admit("ANYONE", "192.0.2.1") == "half"


@pytest.mark.parametrize(
    ("calling", "host"),
    [
        pytest.param("UNIT", "10.3.0.1", id="host-outside-the-networks"),
        pytest.param("OTHER", "10.1.0.1", id="unknown-ae-inside-a-network"),
        pytest.param("UNIT", "not-an-address", id="host-not-an-address"),
    ],
)
def test_allowlist_refuses(calling: str, host: str) -> None:
    allow = AllowList(
        make_config(
            Path("unused"),
            sources=[
                {"ae_title": "UNIT", "hosts": ["10.1.0.0/16"], "profile": "half"},
                {"ae_title": "UNIT", "hosts": ["10.2.0.7"], "profile": "deep"},
            ],
        )
    )
    with pytest.raises(Refused) as refused:
        allow.admit(calling, host)
    assert refused.value.rejection == CALLING_AE_NOT_RECOGNISED


# Storage with DCMTK


def test_storescu_image_is_spooled_and_recorded(serve, tmp_path: Path) -> None:
    scp, sink = serve()
    path, sent = mammogram(tmp_path, seed=1)
    assert stored_ok(storescu(scp.port, path))
    assert stored_ok(storescu(scp.port, mammogram(tmp_path, seed=2)[0], calling="MAMMO2"))

    first, second = sink.jobs
    spooled = Path(first.fields["input_path"])
    data = spooled.read_bytes()
    received = pydicom.dcmread(spooled)
    assert received == sent
    assert np.array_equal(received.pixel_array, sent.pixel_array)
    assert body(spooled) == body(path)
    assert spooled == scp.spool.root / sent.StudyInstanceUID / (
        f"{sent.SOPInstanceUID}-{hashlib.sha256(data).hexdigest()[:12]}.dcm"
    )
    assert first.fields == {
        "sop_instance_uid": sent.SOPInstanceUID,
        "study_instance_uid": sent.StudyInstanceUID,
        "series_instance_uid": sent.SeriesInstanceUID,
        "sop_class_uid": MG_FOR_PROCESSING,
        "transfer_syntax_uid": ExplicitVRLittleEndian,
        "calling_ae": "MAMMO1",
        "called_ae": NODE,
        "peer_host": "127.0.0.1",
        "station_name": "SIMULATOR",
        "detector_serial": "SIM-0001",
        "profile": "half",
        "input_path": str(spooled),
        "input_sha256": hashlib.sha256(data).hexdigest(),
        "input_bytes": len(data),
        "pass_through_to": [],  # restored, not passed through
        "patient_id": sent.PatientID,  # for the audit trail
    }
    assert second.fields["profile"] == "deep"  # the restoration plan is decided by the worker at claim time
    assert list(scp.spool.incoming.iterdir()) == []


def test_a_detector_known_by_its_detector_id_is_recorded(serve, tmp_path: Path) -> None:
    scp, sink = serve()
    _, ds = mammogram(tmp_path, seed=22)
    del ds.DeviceSerialNumber
    ds.DetectorID = "DET-9"
    save_dataset(ds, path := tmp_path / "detector-id.dcm")
    assert stored_ok(storescu(scp.port, path))
    assert [job.fields["detector_serial"] for job in sink.jobs] == ["DET-9"]


COMPRESSED = {
    "jpeg-ls": ("-xt", "1.2.840.10008.1.2.4.80", lambda s, t: dcmtk_convert("dcmcjpls", s, t)),
    "jpeg-2000": ("-xv", "1.2.840.10008.1.2.4.90", lambda s, t: gdcmconv(s, t, "--j2k")),
    "rle": ("-xr", "1.2.840.10008.1.2.5", lambda s, t: dcmtk_convert("dcmcrle", s, t)),
    "deflated": ("-xd", "1.2.840.10008.1.2.1.99", lambda s, t: gdcmconv(s, t, "--deflated")),
    "big-endian": ("-xb", "1.2.840.10008.1.2.2", lambda s, t: dcmtk_convert("dcmconv", s, t, "+tb")),
}


@pytest.mark.parametrize("encoding", COMPRESSED)
def test_lossless_encodings_are_kept_as_received(encoding: str, serve, tmp_path: Path) -> None:
    option, syntax, convert = COMPRESSED[encoding]
    raw, sent = mammogram(tmp_path, seed=3)
    encoded = convert(raw, tmp_path / f"{encoding}.dcm")
    scp, sink = serve()
    assert stored_ok(storescu(scp.port, encoded, option))
    (job,) = sink.jobs
    spooled = Path(job.fields["input_path"])
    assert job.fields["transfer_syntax_uid"] == syntax
    assert pydicom.dcmread(spooled) == pydicom.dcmread(encoded)
    if encoding != "deflated":  # storescu itself re-deflates at its own level; the rest go byte for byte
        assert body(spooled) == body(encoded)
    assert np.array_equal(pydicom.dcmread(spooled).pixel_array, sent.pixel_array)


def test_echoscu_is_answered(serve) -> None:
    scp, _ = serve()
    result = subprocess.run(
        [require_tool("echoscu"), "-aet", "MAMMO1", "-aec", NODE, "127.0.0.1", str(scp.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# Association rejection


@pytest.mark.parametrize(
    ("calling", "called", "hosts", "reason"),
    [
        pytest.param("STRANGER", NODE, [], "Calling AE Title Not Recognized", id="unknown-calling-ae"),
        pytest.param("MAMMO1", "SOMEONE", [], "Called AE Title Not Recognized", id="wrong-called-ae"),
        pytest.param("MAMMO1", NODE, ["10.0.0.0/8"], "Calling AE Title Not Recognized", id="host-outside-the-network"),
    ],
)
def test_association_rejected_with_reason(
    calling: str, called: str, hosts: list[str], reason: str, serve, tmp_path: Path, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="dicom_node.receive")
    config = make_config(tmp_path / "node", sources=[{"ae_title": "MAMMO1", "hosts": hosts, "profile": "half"}])
    scp, sink = serve(config)
    result = storescu(scp.port, mammogram(tmp_path, seed=4)[0], calling=calling, called=called)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Result: Rejected Permanent, Source: Service User" in output
    assert f"Reason: {reason}" in output
    assert sink.jobs == [] and spooled_files(scp) == []
    assert any(r.levelno == logging.WARNING and "rejected" in r.getMessage() for r in caplog.records)


def test_host_inside_network_is_accepted(serve, tmp_path: Path) -> None:
    source = {"ae_title": "MAMMO1", "hosts": ["127.0.0.0/8"], "profile": "deep"}
    scp, sink = serve(make_config(tmp_path / "node", sources=[source]))
    assert stored_ok(storescu(scp.port, mammogram(tmp_path, seed=5)[0]))
    assert [job.fields["profile"] for job in sink.jobs] == ["deep"]


def test_without_sources_any_calling_ae_gets_first_profile(serve, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="dicom_node.receive")
    scp, sink = serve(make_config(tmp_path / "node", sources=[]))
    assert stored_ok(storescu(scp.port, mammogram(tmp_path, seed=6)[0], calling="WHOEVER"))
    assert [job.fields["profile"] for job in sink.jobs] == ["half"]
    assert any("accepting any calling AE" in r.getMessage() for r in caplog.records)


def test_low_disk_refuses_associations(serve, tmp_path: Path) -> None:
    scp, sink = serve(make_config(tmp_path / "node", min_free_disk_mb=1e12))
    result = storescu(scp.port, mammogram(tmp_path, seed=7)[0])
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Result: Rejected Transient, Source: Service Provider (Presentation Related)" in output
    assert "Reason: Local Limit Exceeded" in output
    assert sink.jobs == [] and spooled_files(scp) == []


def test_association_limit_refuses_more(serve, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="dicom_node.receive")
    scp, sink = serve(make_config(tmp_path / "node", max_associations=1))
    ae = AE(ae_title="MAMMO1")
    ae.add_requested_context(MG_FOR_PROCESSING, ExplicitVRLittleEndian)
    held = ae.associate("127.0.0.1", scp.port, ae_title=NODE)
    assert held.is_established
    try:
        result = storescu(scp.port, mammogram(tmp_path, seed=16)[0])
    finally:
        held.release()
    output = result.stdout + result.stderr
    assert "Result: Rejected Transient, Source: Service Provider (Presentation Related)" in output
    assert sink.jobs == []
    assert any("association limit" in r.getMessage() for r in caplog.records)
    assert stored_ok(storescu(scp.port, mammogram(tmp_path, seed=16)[0]))


def test_admission_check_failing_rejects_instead_of_accepting(
    serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scp, sink = serve()

    def broken(calling_ae: str, peer_host: str) -> str:
        raise RuntimeError("bug in the allow-list")

    monkeypatch.setattr(scp.allowlist, "admit", broken)
    result = storescu(scp.port, mammogram(tmp_path, seed=17)[0])
    assert "Result: Rejected Transient, Source: Service User" in result.stdout + result.stderr
    assert result.returncode != 0 and sink.jobs == []


def test_stop_aborts_an_idle_association_after_the_grace_time(serve) -> None:
    scp, _ = serve()
    ae = AE(ae_title="MAMMO1")
    ae.add_requested_context(MG_FOR_PROCESSING, ExplicitVRLittleEndian)
    held = ae.associate("127.0.0.1", scp.port, ae_title=NODE)
    assert held.is_established
    started = time.perf_counter()
    scp.stop(grace_s=0.3)
    stop_s = time.perf_counter() - started
    wait_until(lambda: not held.is_established, 5, interval=0.05, message="the idle association stayed established")
    print(f"stop with one idle association: {stop_s:.2f} s")
    assert held.is_aborted and 0.3 <= stop_s < 3


# Failures: never Success for an image that is not safe, and keep serving


def test_database_down_answers_out_of_resources_then_recovers(serve, tmp_path: Path) -> None:
    scp, sink = serve()
    path, _ = mammogram(tmp_path, seed=8)
    sink.down = True
    result = storescu(scp.port, path)
    assert "Received Store Response (Refused: OutOfResources)" in result.stdout + result.stderr
    status = send_with_pynetdicom(scp.port, path)
    assert status.Status == 0xA700 and "ConnectionError" in status.ErrorComment
    assert spooled_files(scp) == []  # nothing acknowledged, nothing left behind
    sink.down = False
    assert stored_ok(storescu(scp.port, path))
    assert len(sink.jobs) == 1 and len(spooled_files(scp)) == 1


def test_recording_failure_after_spooling_leaves_no_file(serve, tmp_path: Path) -> None:
    class FailsOnRecord(MemorySink):
        spooled_when_recorded: list[bool] = []

        def record_received(self, **fields: Any) -> int:
            # Noted here and asserted below: an assert in the SCP's thread would only become a failure status.
            self.spooled_when_recorded.append(Path(fields["input_path"]).is_file())
            raise ConnectionError("commit failed")

    scp, sink = serve(sink=FailsOnRecord())
    status = send_with_pynetdicom(scp.port, mammogram(tmp_path, seed=9)[0])
    assert status.Status == 0xA700
    assert sink.spooled_when_recorded == [True]  # spooled before recording
    assert spooled_files(scp) == []


def test_spool_failure_answers_out_of_resources(serve, tmp_path: Path) -> None:
    scp, sink = serve()
    path, ds = mammogram(tmp_path, seed=10)
    (scp.spool.root / ds.StudyInstanceUID).write_text("a file where the study folder should be")
    assert send_with_pynetdicom(scp.port, path).Status == 0xA700
    assert sink.jobs == [] and list(scp.spool.incoming.iterdir()) == []
    assert stored_ok(storescu(scp.port, mammogram(tmp_path, seed=11)[0]))


def _no_instance_uid() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = MG_FOR_PROCESSING
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.1"
    return ds


# (dataset bytes after a valid file meta, the meta's SOP Instance UID, a status accepted besides 0xCxxx)
UNREADABLE = [
    pytest.param(lambda: b"\x08\x00\x18\x00UI\xff\xff" + bytes(range(256)) * 4, "1.2.3.4", None, id="garbage"),
    pytest.param(lambda: _encode(_no_instance_uid()), "1.2.3.4", None, id="no-SOPInstanceUID"),
    pytest.param(
        lambda: _encode(_with(_no_instance_uid(), SOPInstanceUID="../../x")), "../../x", None, id="path-in-a-UID"
    ),
    pytest.param(
        lambda: _encode(_with(_no_instance_uid(), SOPInstanceUID="1.2.3.4", SOPClassUID="1.2.840.10008.5.1.4.1.1.2")),
        "1.2.3.4",
        0xA900,
        id="class-differs-from-the-context",
    ),
]


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:The value length")  # the node reading junk
@pytest.mark.parametrize(("dataset_bytes", "sop_instance_uid", "also_accepted"), UNREADABLE)
def test_unreadable_dataset_fails_and_node_keeps_serving(
    dataset_bytes: Callable[[], bytes], sop_instance_uid: str, also_accepted: int | None, serve, tmp_path: Path
) -> None:
    scp, sink = serve()
    path = file_with_body(tmp_path / "bad.dcm", dataset_bytes(), sop_instance_uid=sop_instance_uid)
    status = send_with_pynetdicom(scp.port, path)
    print(f"status 0x{status.Status:04X} {status.get('ErrorComment', '')}")
    assert 0xC000 <= status.Status <= 0xCFFF or status.Status == also_accepted
    assert sink.jobs == [] and spooled_files(scp) == []
    assert stored_ok(storescu(scp.port, mammogram(tmp_path, seed=12)[0]))


@pytest.mark.parametrize(
    ("spoil", "comment"),
    [
        pytest.param(
            lambda ds: setattr(ds, "PixelData", ds.PixelData[:1000]),
            "Pixel Data is 1000 bytes, not 15360 (96x80x1x16 bits)",
            id="truncated-pixel-data",
        ),
        pytest.param(lambda ds: delattr(ds, "PixelData"), "dataset lacks PixelData", id="no-pixel-data"),
    ],
)
def test_pixels_that_cannot_be_read_are_refused_with_the_reason(
    spoil: Callable[[Dataset], None], comment: str, serve, tmp_path: Path, caplog
) -> None:
    """0xC000 while the modality still holds the image, not Success and a failed job; the node keeps serving."""
    caplog.set_level(logging.WARNING, logger="dicom_node.receive")
    scp, sink = serve()
    good, ds = mammogram(tmp_path, seed=18)
    spoil(ds)
    save_dataset(ds, bad := tmp_path / "bad.dcm")
    result = storescu(scp.port, bad, "-d")
    assert store_response(result) == (0xC000, comment)
    assert sink.jobs == [] and spooled_files(scp) == []
    assert any(f"refused 0xC000: {comment}" in r.getMessage() for r in caplog.records)
    assert stored_ok(storescu(scp.port, good))
    assert len(sink.jobs) == 1


def test_a_dataset_cut_inside_its_pixel_data_is_refused(serve, tmp_path: Path) -> None:
    """The Pixel Data element announces 15360 bytes but the stream ends 100 bytes early (pydicom does not warn)."""
    scp, sink = serve()
    path, ds = mammogram(tmp_path, seed=19)
    cut = file_with_body(tmp_path / "cut.dcm", body(path)[:-100], sop_instance_uid=ds.SOPInstanceUID)
    status = send_with_pynetdicom(scp.port, cut)
    assert (status.Status, status.ErrorComment) == (0xC000, "Pixel Data is 15260 bytes, not 15360 (96x80x1x16 bits)")
    assert sink.jobs == [] and spooled_files(scp) == []


def for_presentation(folder: Path, seed: int) -> Path:
    """A valid MG image, but For Presentation: a class the node cannot restore."""
    _, ds = mammogram(folder, seed)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MG_FOR_PRESENTATION
    save_dataset(ds, path := folder / f"presentation-{seed}.dcm")
    return path


def test_for_presentation_is_refused_at_negotiation_and_the_node_keeps_serving(serve, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="dicom_node.receive")
    scp, sink = serve()
    result = storescu(scp.port, for_presentation(tmp_path, seed=20), "-d")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "(Abstract Syntax Not Supported)" in output and "No Acceptable Presentation Contexts" in output
    assert sink.jobs == [] and spooled_files(scp) == []
    wait_until(
        lambda: any(
            "proposes no SOP class this node stores" in r.getMessage() and "For Presentation" in r.getMessage()
            for r in caplog.records
        ),
        5,
        message="the refused contexts were not logged",
    )
    assert stored_ok(storescu(scp.port, mammogram(tmp_path, seed=21)[0]))
    assert len(sink.jobs) == 1


def test_for_presentation_sent_on_the_for_processing_context_does_not_match(
    serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pynetdicom's SCP does not compare a request's SOP class with its context's: the handler does."""
    scp, sink = serve()
    ae = AE(ae_title="MAMMO1")
    ae.add_requested_context(MG_FOR_PROCESSING, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title=NODE)
    assert assoc.is_established
    (processing,) = assoc.accepted_contexts
    monkeypatch.setattr(assoc, "_get_valid_context", lambda *args, **kwargs: processing)  # a sender that errs
    try:
        status = assoc.send_c_store(for_presentation(tmp_path, seed=23))
    finally:
        assoc.release()
    assert status.Status == 0xA900
    assert status.ErrorComment.startswith("SOPClassUID differs from the presentation context's")
    assert sink.jobs == [] and spooled_files(scp) == []


def _with(ds: Dataset, **attributes: str) -> Dataset:
    copy = Dataset(ds)
    with warnings.catch_warnings():  # pydicom rightly warns about the invalid UIDs made here on purpose
        warnings.simplefilter("ignore")
        for name, value in attributes.items():
            setattr(copy, name, value)
    return copy


def _encode(ds: Dataset) -> bytes:
    return encode(ds, False, True)


# Duplicates


def test_identical_duplicate_makes_no_new_job(serve, tmp_path: Path) -> None:
    scp, sink = serve()
    path, ds = mammogram(tmp_path, seed=13)
    assert stored_ok(storescu(scp.port, path))
    assert stored_ok(storescu(scp.port, path))
    assert len(sink.jobs) == 1 and len(spooled_files(scp)) == 1

    changed = ds.copy()
    changed.PixelData = np.flipud(ds.pixel_array).tobytes()
    changed_path = tmp_path / "changed.dcm"
    save_dataset(changed, changed_path)
    assert stored_ok(storescu(scp.port, changed_path))
    assert len(sink.jobs) == 2 and len(spooled_files(scp)) == 2
    assert sink.jobs[0].input_sha256 != sink.jobs[1].input_sha256

    sink.jobs[0].status = sink.jobs[1].status = JobState.failed  # a failed job is received again
    assert stored_ok(storescu(scp.port, path))
    assert len(sink.jobs) == 3
    assert len({job.fields["input_path"] for job in sink.jobs}) == 3


def test_reprocess_all_makes_a_job_per_store_with_its_own_file(serve, tmp_path: Path) -> None:
    scp, sink = serve(make_config(tmp_path / "node", duplicate_policy="reprocess-all"))
    path, _ = mammogram(tmp_path, seed=14)
    for _ in range(3):
        assert stored_ok(storescu(scp.port, path))
    paths = [Path(job.fields["input_path"]) for job in sink.jobs]
    assert len(set(paths)) == 3 and all(p.read_bytes() == paths[0].read_bytes() for p in paths)
    assert [p.name.removesuffix(".dcm").rsplit("-", 1)[-1] for p in paths][1:] == ["2", "3"]


# Spool


def test_spool_start_removes_partial_writes(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    (spool.incoming / "tmpabc.part").write_bytes(b"half an image")
    assert spool.prepare() == 1
    assert list(spool.incoming.iterdir()) == []


# Timing


def test_full_size_store_time(serve, tmp_path: Path, caplog) -> None:
    """How long the modality waits for a 4096×3328 raw image; the handler's share comes from its log."""
    caplog.set_level(logging.INFO, logger="dicom_node.receive")
    scp, sink = serve(make_config(tmp_path / "node", duplicate_policy="reprocess-all"))  # every store writes
    path, _ = mammogram(tmp_path, seed=15, shape=(4096, 3328))
    runs_ms = []
    for _ in range(3):
        started = time.perf_counter()
        assert stored_ok(storescu(scp.port, path))
        runs_ms.append((time.perf_counter() - started) * 1e3)
    handler = [r.getMessage().rsplit(", ", 1)[-1] for r in caplog.records if ": job " in r.getMessage()]
    print(
        f"{path.stat().st_size / 1e6:.1f} MB 4096x3328 uint16 via storescu: whole run (process start, "
        f"association, transfer, answer) {', '.join(f'{ms:.0f}' for ms in runs_ms)} ms; "
        f"handler (parse and checks, sha256, spool+fsync, job) {', '.join(handler)}"
    )
    assert len(sink.jobs) == 3 and len(handler) == 3


def test_a_profile_may_pass_a_class_through_unchanged_and_only_its_own_sources(serve, tmp_path: Path) -> None:
    """`pass_through`: For Presentation from MAMMO1 (whose profile passes it) is stored, not checked
    for restoration, and recorded to go unchanged to the profile's destinations; from MAMMO2 (whose
    profile does not) it is refused 0x0122 although the class was negotiated for MAMMO1's sake."""
    config = parse_config(
        {
            "node": {"ae_title": NODE, "bind": "127.0.0.1", "data_dir": str(tmp_path / "node"), "min_free_disk_mb": 0},
            "sources": [{"ae_title": "MAMMO1", "profile": "half"}, {"ae_title": "MAMMO2", "profile": "strict"}],
            "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}],
            "profiles": {
                "half": {"dose_fraction": 0.5, "destinations": ["pacs"], "pass_through": [MG_FOR_PRESENTATION]},
                "strict": {"dose_fraction": 0.5, "destinations": ["pacs"]},
            },
        }
    )
    scp, sink = serve(config)
    assert stored_ok(storescu(scp.port, for_presentation(tmp_path, seed=40)))
    [job] = sink.jobs
    assert job.fields["sop_class_uid"] == MG_FOR_PRESENTATION and job.fields["pass_through_to"] == ["pacs"]
    ae = AE(ae_title="MAMMO2")
    ae.add_requested_context(MG_FOR_PRESENTATION, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title=NODE)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(for_presentation(tmp_path, seed=41))
    finally:
        assoc.release()
    assert status.Status == 0x0122 and status.ErrorComment == f"{MG_FOR_PRESENTATION}: not passed by profile strict"
    assert len(sink.jobs) == 1
