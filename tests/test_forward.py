"""Forwarding against real peers: DCMTK storescp (and a scripted pynetdicom SCP for status codes).

Every peer listens on a free loopback port and is stopped by its fixture. The watchdog test uses an
image large enough to fill the socket buffers, so the sender really blocks in socket.send.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import CTImageStorage, Verification

from dicom_node import config
from dicom_node import files as files_module
from dicom_node.forward import FolderDestination, NetworkDestination, SendResult, echo, make_destination, send_file
from dicom_node.imaging import MG_FOR_PROCESSING, raw_mammogram_dataset, save_dataset

from dicomtools import dcmtk_convert, transfer_syntax_of
from peers import Storescp, free_port, wait_until

CALLING_AE = "DOSENODE"
MAX_14_BIT = (1 << 14) - 1


def mammogram(folder: Path, shape: tuple[int, int] = (64, 48), seed: int = 1) -> tuple[Path, np.ndarray]:
    pixels = np.random.default_rng(seed).integers(0, MAX_14_BIT + 1, size=shape, dtype=np.uint16)
    path = folder / f"raw-{seed}.dcm"
    save_dataset(raw_mammogram_dataset(pixels, seed=seed), path)
    return path, pixels


def send(peer: Storescp, path: Path, timeout_s: float = 10) -> SendResult:
    """Send to a storescp peer with the node's sender."""
    return send_file(
        path, ae_title=peer.ae_title, host="127.0.0.1", port=peer.port, calling_ae=CALLING_AE, timeout_s=timeout_s
    )


def threads_started_since(before: set[threading.Thread]) -> list[str]:
    return [t.name for t in threading.enumerate() if t not in before and t.is_alive()]


def assert_no_new_threads(before: set[threading.Thread], settle_s: float = 1.0) -> None:
    """Every thread started since `before` ends within a short settling time."""
    wait_until(
        lambda: not threads_started_since(before),
        settle_s,
        interval=0.05,
        message=lambda: f"threads left running: {threads_started_since(before)}",
    )


def test_sent_file_arrives_unchanged(storescp, tmp_path):
    peer = storescp()
    path, pixels = mammogram(tmp_path)
    before = set(threading.enumerate())
    result = send(peer, path)
    print(f"\nstore to storescp: {result.message} in {result.seconds * 1000:.0f} ms")
    assert result.ok and result.status == 0, result
    assert "STORESCP@127.0.0.1" in result.message
    [received] = peer.received()
    arrived, sent = pydicom.dcmread(received), pydicom.dcmread(path)
    assert arrived.SOPInstanceUID == sent.SOPInstanceUID
    assert arrived.SOPClassUID == MG_FOR_PROCESSING
    assert arrived.PixelData == sent.PixelData
    np.testing.assert_array_equal(arrived.pixel_array, pixels)
    assert_no_new_threads(before)


def test_compressed_file_is_decompressed_for_a_peer_taking_only_uncompressed(storescp, tmp_path):
    peer = storescp()  # default storescp: uncompressed transfer syntaxes only
    raw, pixels = mammogram(tmp_path)
    compressed = dcmtk_convert("dcmcjpls", raw, tmp_path / "jpegls.dcm")
    assert transfer_syntax_of(compressed) == JPEGLSLossless
    result = send(peer, compressed)
    print(f"\nJPEG-LS to uncompressed-only storescp: {result.message} in {result.seconds * 1000:.0f} ms")
    assert result.ok, result
    [received] = peer.received()
    assert transfer_syntax_of(received) == ExplicitVRLittleEndian
    arrived = pydicom.dcmread(received)
    assert arrived.SOPInstanceUID == pydicom.dcmread(raw).SOPInstanceUID
    np.testing.assert_array_equal(arrived.pixel_array, pixels)


def test_compressed_file_goes_as_it_is_to_a_peer_taking_it(storescp, tmp_path):
    peer = storescp("+xt", "+B")  # accepts JPEG-LS lossless; writes what it receives, bit for bit
    raw, pixels = mammogram(tmp_path)
    compressed = dcmtk_convert("dcmcjpls", raw, tmp_path / "jpegls.dcm")
    result = send(peer, compressed)
    assert result.ok, result
    [received] = peer.received()
    assert transfer_syntax_of(received) == JPEGLSLossless
    assert pydicom.dcmread(received).PixelData == pydicom.dcmread(compressed).PixelData
    np.testing.assert_array_equal(pydicom.dcmread(received).pixel_array, pixels)


def test_watchdog_frees_a_send_blocked_by_a_receiver_that_stops_reading(storescp, tmp_path):
    sleep_s, timeout_s = 6, 2
    peer = storescp("--sleep-during", str(sleep_s))
    path, _ = mammogram(tmp_path, shape=(3000, 2400))  # 14 MB: more than the socket buffers hold
    before = set(threading.enumerate())
    started = time.monotonic()
    result = send(peer, path, timeout_s=timeout_s)
    elapsed = time.monotonic() - started
    print(f"\nstalled receiver, timeout {timeout_s} s: returned after {elapsed:.2f} s: {result.message}")
    assert not result.ok and result.transient, result
    assert elapsed < sleep_s and elapsed < timeout_s + 3
    assert_no_new_threads(before)


def test_connection_refused_is_transient(tmp_path):
    path, _ = mammogram(tmp_path)
    port = free_port()  # nothing listens there
    result = send_file(path, ae_title="PACS", host="127.0.0.1", port=port, calling_ae=CALLING_AE, timeout_s=5)
    print(f"\nclosed port: {result.message} in {result.seconds * 1000:.0f} ms")
    assert not result.ok and result.transient
    assert "refused" in result.message
    assert result.seconds < 5


def test_refused_association_is_permanent(storescp, tmp_path):
    peer = storescp("--refuse")
    path, _ = mammogram(tmp_path)
    result = send(peer, path)
    print(f"\nstorescp --refuse: {result.message}")
    assert not result.ok and not result.transient
    assert "rejected permanently" in result.message
    assert peer.received() == []


@pytest.mark.parametrize("option", ["--abort-during", "--abort-after"])
def test_abort_by_the_receiver_is_transient(storescp, tmp_path, option):
    peer = storescp(option)
    path, _ = mammogram(tmp_path)
    before = set(threading.enumerate())
    result = send(peer, path)
    print(f"\nstorescp {option}: {result.message} in {result.seconds * 1000:.0f} ms")
    assert not result.ok and result.transient and result.status is None
    assert result.seconds < 5
    assert_no_new_threads(before)


def test_echo(storescp):
    peer = storescp()
    answered = echo(ae_title="STORESCP", host="127.0.0.1", port=peer.port, calling_ae=CALLING_AE, timeout_s=5)
    closed = echo(ae_title="STORESCP", host="127.0.0.1", port=free_port(), calling_ae=CALLING_AE, timeout_s=5)
    print(f"\necho: {answered.message} in {answered.seconds * 1000:.0f} ms; closed port: {closed.message}")
    assert answered.ok and answered.status == 0
    assert not closed.ok and closed.transient


@pytest.fixture
def scripted_scp() -> Iterator[Callable[..., int]]:
    """pynetdicom SCPs answering C-STORE with a chosen status, or taking only a chosen SOP class."""
    servers = []

    def start(
        status: int = 0,
        sop_class: str = MG_FOR_PROCESSING,
        max_associations: int = 10,
        calling_aets: tuple[str, ...] = (),
    ) -> int:
        ae = AE(ae_title="SCRIPTED")
        ae.maximum_associations = max_associations
        ae.require_calling_aet = list(calling_aets)
        ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        port = free_port()
        servers.append(
            ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: status)])
        )
        return port

    try:
        yield start
    finally:
        for server in servers:
            server.shutdown()


# Classification from DICOM PS3.4 B.2.3 and PS3.7 C: warnings deliver; out of resources, resource
# limitation and processing failure can clear; a refused SOP class, a mismatching data set, an
# unreadable one and a missing authorisation do not.
STATUS_OUTCOMES = {
    0xB000: "ok",
    0xB006: "ok",
    0xB007: "ok",
    0xA700: "transient",
    0xA7FF: "transient",
    0x0213: "transient",
    0x0110: "transient",
    0xA900: "permanent",
    0xC000: "permanent",
    0xC123: "permanent",
    0x0122: "permanent",
    0x0124: "permanent",
}


@pytest.mark.parametrize("status", STATUS_OUTCOMES, ids=lambda s: f"0x{s:04X}")
def test_store_status_is_classified(scripted_scp, tmp_path, status):
    port = scripted_scp(status=status)
    path, _ = mammogram(tmp_path)
    result = send_file(path, ae_title="SCRIPTED", host="127.0.0.1", port=port, calling_ae=CALLING_AE, timeout_s=5)
    print(f"\n{result.message}")
    outcome = "ok" if result.ok else ("transient" if result.transient else "permanent")
    assert (outcome, result.status) == (STATUS_OUTCOMES[status], status)
    assert f"0x{status:04X}" in result.message


def test_sop_class_not_accepted_is_permanent(scripted_scp, tmp_path):
    port = scripted_scp(sop_class=CTImageStorage)
    path, _ = mammogram(tmp_path)
    result = send_file(path, ae_title="SCRIPTED", host="127.0.0.1", port=port, calling_ae=CALLING_AE, timeout_s=5)
    print(f"\nMG to a CT-only peer: {result.message}")
    assert not result.ok and not result.transient


def test_unknown_calling_ae_rejection_is_permanent_and_says_why(scripted_scp, tmp_path):
    port = scripted_scp(calling_aets=("SOMEONE",))
    path, _ = mammogram(tmp_path)
    result = send_file(path, ae_title="SCRIPTED", host="127.0.0.1", port=port, calling_ae=CALLING_AE, timeout_s=5)
    print(f"\ncalling AE not on the peer's list: {result.message}")
    assert not result.ok and not result.transient
    assert "rejected permanently: calling AE title not recognised" in result.message


def test_busy_peer_rejection_is_transient(scripted_scp, tmp_path):
    port = scripted_scp(max_associations=1)
    holder = AE(ae_title="HOLDER")
    holder.add_requested_context(Verification)
    held = holder.associate("127.0.0.1", port, ae_title="SCRIPTED")
    try:
        assert held.is_established
        path, _ = mammogram(tmp_path)
        result = send_file(path, ae_title="SCRIPTED", host="127.0.0.1", port=port, calling_ae=CALLING_AE, timeout_s=5)
    finally:
        held.release()
    print(f"\npeer at its association limit: {result.message}")
    assert not result.ok and result.transient
    assert "rejected transiently" in result.message


def test_folder_destination_writes_the_file_under_its_uid(tmp_path):
    path, _ = mammogram(tmp_path)
    folder = tmp_path / "out" / "derived"  # does not exist yet
    destination = FolderDestination("archive", folder)
    result = destination.send(path)
    assert result.ok, result
    uid = pydicom.dcmread(path).SOPInstanceUID
    assert sorted(p.name for p in folder.iterdir()) == [f"{uid}.dcm"]
    assert (folder / f"{uid}.dcm").read_bytes() == path.read_bytes()
    again = destination.send(path)  # a retry after a crash replaces the same file
    assert again.ok and sorted(p.name for p in folder.iterdir()) == [f"{uid}.dcm"]


def test_folder_destination_leaves_nothing_partial_when_the_write_fails(tmp_path, monkeypatch):
    path, _ = mammogram(tmp_path)
    folder = tmp_path / "out"

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files_module.os, "replace", disk_full)  # the rename in write_atomically
    result = FolderDestination("archive", folder).send(path)
    print(f"\ndisk full: {result.message}")
    assert not result.ok and result.transient
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("where", ["file", "below a file"])
def test_folder_destination_on_a_non_directory_is_permanent(tmp_path, where):
    path, _ = mammogram(tmp_path)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file")
    destination = FolderDestination("archive", blocker if where == "file" else blocker / "sub")
    result, checked = destination.send(path), destination.echo()
    print(f"\nfolder is {where}: {result.message}")
    assert not result.ok and not result.transient
    assert not checked.ok and not checked.transient
    assert blocker.read_text() == "a file"


def test_folder_destination_echo_creates_and_checks_the_folder(tmp_path):
    folder = tmp_path / "new"
    result = FolderDestination("archive", folder).echo()
    assert result.ok and folder.is_dir() and list(folder.iterdir()) == []


def test_make_destination_from_config(tmp_path, storescp):
    peer = storescp()
    network = make_destination(
        config.Destination(name="pacs", ae_title="STORESCP", host="127.0.0.1", port=peer.port, timeout_s=7), CALLING_AE
    )
    folder = make_destination(config.Destination(name="archive", folder=Path("derived")), CALLING_AE, base_dir=tmp_path)
    assert isinstance(network, NetworkDestination) and network.timeout_s == 7
    assert isinstance(folder, FolderDestination) and folder.folder == tmp_path / "derived"
    path, _ = mammogram(tmp_path)
    assert network.echo().ok and network.send(path).ok and folder.send(path).ok
    assert len(peer.received()) == 1 and len(list((tmp_path / "derived").iterdir())) == 1
    assert "STORESCP@127.0.0.1" in network.describe() and "derived" in folder.describe()
