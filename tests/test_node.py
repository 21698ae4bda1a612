"""The running node against real peers: DCMTK storescu as the modality, Orthanc as the PACS.

`dicom-node serve` runs as a subprocess with its own data folder on free loopback ports; the
tests look at the result the way IT would: in Orthanc's REST API, with dciodvfy, and in the job log.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from dicom_node.config import load_config
from dicom_node.imaging import read_mammogram
from dicom_node.joblog import JobLog

from dicomtools import dciodvfy_errors, dcmtk_convert, gdcmconv
from nodes import NODE_BIN, RunningNode, make_input, write_config
from peers import Orthanc, free_port, storescu, wait_for_port, wait_until


@pytest.fixture
def pacs(tmp_path):
    orthanc = Orthanc(tmp_path / "orthanc").start()
    yield orthanc
    orthanc.stop()


@pytest.fixture
def node_factory(tmp_path):
    nodes = []

    def start(pacs_port: int, **options) -> RunningNode:
        port = free_port()
        folder = tmp_path / f"node{len(nodes)}"
        folder.mkdir()
        options.setdefault("selftest_port", free_port())
        node = RunningNode(folder, write_config(folder, port, pacs_port, **options), port).start()
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop()


def test_storescu_to_node_to_orthanc(tmp_path, pacs, node_factory, sim_noise):
    node = node_factory(pacs.dicom_port)
    source = make_input(tmp_path, seed=1)
    result = storescu(node.port, source)
    assert result.returncode == 0, result.stderr
    [job] = node.wait_for_jobs(1)
    source_ds = dcmread(source)
    orthanc_id = pacs.wait_for(job.derived_sop_instance_uid)
    received = tmp_path / "received.dcm"
    received.write_bytes(pacs.file(orthanc_id))
    derived = dcmread(received)
    # The recipe of docs/dicom.md, seen from PACS.
    assert derived.SOPClassUID == source_ds.SOPClassUID
    assert derived.StudyInstanceUID == source_ds.StudyInstanceUID
    assert derived.SeriesInstanceUID != source_ds.SeriesInstanceUID
    assert list(derived.ImageType)[:2] == ["DERIVED", "PRIMARY"]
    assert derived.SourceImageSequence[0].ReferencedSOPInstanceUID == source_ds.SOPInstanceUID
    assert derived.ContributingEquipmentSequence[-1].Manufacturer
    assert "gat-bm3d" in derived.DerivationDescription
    assert "ExposureInuAs" in source_ds and derived.ExposureInuAs == source_ds.ExposureInuAs
    assert dciodvfy_errors(received) == []
    # Full-dose scale: the breast's signal doubled.
    restored = read_mammogram(received).pixels.astype(float) - sim_noise.offset
    low = read_mammogram(source).pixels.astype(float) - sim_noise.offset
    inside = low < 0.5 * np.percentile(low, 99)
    ratio = np.median(restored[inside]) / np.median(low[inside])
    print(f"restored/low-dose signal ratio {ratio:.3f}")
    assert 1.9 < ratio < 2.1
    # The job row: every stage time and the QC figures.
    print({k: getattr(job, k) for k in ("decode_s", "restore_s", "derive_s", "device", "attempts")})
    for stamp in ("received_at", "claimed_at", "decoded_at", "restored_at", "derived_at", "completed_at"):
        assert getattr(job, stamp) is not None, stamp
    assert job.decode_s >= 0 and job.restore_s > 0 and job.derive_s >= 0
    assert job.qc["mean_ratio"] == pytest.approx(1.0, abs=0.02)
    assert job.calling_ae == "MAMMO1" and job.profile == "half-dose" and job.pipeline == "gat-bm3d"
    [delivery] = node.joblog().deliveries(job.id)
    assert str(delivery.status) == "sent" and delivery.send_s is not None and delivery.sent_at is not None
    # The audit trail of the running node: its configuration, the association, the image in and out.
    trail = [(line.event, line.outcome) for line in reversed(node.joblog().audit_events())]
    assert trail == [
        ("config-loaded", 0),
        ("association-accepted", 0),
        ("instance-received", 0),
        ("instance-sent", 0),
    ]
    started = node.joblog().audit_events(event="config-loaded")[0]
    assert started.detail["sha256"] == hashlib.sha256(node.config_path.read_bytes()).hexdigest()


def test_compressed_inputs_are_restored(tmp_path, pacs, node_factory):
    node = node_factory(pacs.dicom_port)
    raw = make_input(tmp_path, seed=2)
    jpegls = dcmtk_convert("dcmcjpls", raw, tmp_path / "jpegls.dcm")
    raw3 = make_input(tmp_path, seed=3)
    j2k = gdcmconv(raw3, tmp_path / "j2k.dcm", "--j2k")
    assert storescu(node.port, jpegls, options=("-xt",)).returncode == 0
    assert storescu(node.port, j2k, options=("-xv",)).returncode == 0
    jobs = node.wait_for_jobs(2)
    assert {j.transfer_syntax_uid for j in jobs} == {"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90"}
    for job in jobs:
        pacs.wait_for(job.derived_sop_instance_uid)


def test_forward_original_sends_both_images(tmp_path, pacs, node_factory):
    node = node_factory(pacs.dicom_port, forward_original=True)
    source = make_input(tmp_path, seed=5)
    assert storescu(node.port, source).returncode == 0
    [job] = node.wait_for_jobs(1)
    pacs.wait_for(job.derived_sop_instance_uid)
    original = pacs.wait_for(str(dcmread(source).SOPInstanceUID))
    assert dcmread(io.BytesIO(pacs.file(original))).PixelData == dcmread(source).PixelData  # untouched
    assert sorted(str(d.kind) for d in node.joblog().deliveries(job.id)) == ["derived", "original"]


def test_deep_profile_restores_with_the_shipped_model(tmp_path, pacs, node_factory):
    node = node_factory(pacs.dicom_port, pipeline="deep")
    assert storescu(node.port, make_input(tmp_path, seed=6)).returncode == 0
    [job] = node.wait_for_jobs(1)
    derived = dcmread(io.BytesIO(pacs.file(pacs.wait_for(job.derived_sop_instance_uid))))
    assert "gat-dncnn-maps" in derived.DerivationDescription
    assert job.pipeline == "deep" and len(job.model_digest) == 64 and job.device in ("cpu", "cuda")
    assert job.model_name == "gat-dncnn-maps"  # resolved by dose fraction: the profile named none


def test_a_worker_started_alone_takes_the_jobs(tmp_path, pacs, node_factory):
    node = node_factory(pacs.dicom_port, workers=0)  # serve receives and forwards; restoration runs elsewhere
    assert storescu(node.port, make_input(tmp_path, seed=7)).returncode == 0  # recorded before the answer
    time.sleep(2)  # not a wait for an event: the time a worker, were there one, would need to claim the job
    [queued] = node.joblog().list_jobs()
    assert str(queued.status) == "received" and queued.claimed_at is None  # nobody restores it yet
    with open(tmp_path / "worker.log", "w") as log:
        worker = subprocess.Popen(
            [NODE_BIN, "worker", "--config", str(node.config_path)], stdout=log, stderr=log, cwd=node.folder
        )
    try:
        [job] = node.wait_for_jobs(1)
        pacs.wait_for(job.derived_sop_instance_uid)
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0  # stops cleanly


def test_pacs_down_then_up_everything_is_delivered(tmp_path, node_factory):
    pacs = Orthanc(tmp_path / "late-orthanc")
    node = node_factory(pacs.dicom_port)
    sources = [make_input(tmp_path, seed=s) for s in (10, 11, 12)]
    assert storescu(node.port, *sources).returncode == 0

    def all_failed_once() -> list:
        deliveries = node.deliveries()
        return deliveries if len(deliveries) == 3 and all(d.attempts >= 1 and d.last_error for d in deliveries) else []

    # Wait until the node has tried and failed at least once.
    deliveries = wait_until(
        all_failed_once,
        120,
        interval=0.5,
        message=lambda: f"deliveries never failed while PACS was down:\n{node.log()[-3000:]}",
    )
    print("while down:", [d.last_error for d in deliveries])
    pacs.start()
    try:
        jobs = node.wait_for_jobs(3)
        for job in jobs:
            pacs.wait_for(job.derived_sop_instance_uid)
        assert len(pacs.instances()) == 3
    finally:
        pacs.stop()


def test_stalled_receiver_trips_the_watchdog_and_the_job_retries(tmp_path, node_factory, storescp):
    stalled = storescp("--sleep-during", "30", ae_title="ORTHANC")  # stopped by its fixture
    node = node_factory(stalled.port, send_timeout_s=3)
    # A large image, so that the sender blocks in socket.send while the receiver sleeps.
    assert storescu(node.port, make_input(tmp_path, seed=20, shape=(1536, 1024))).returncode == 0
    [delivery] = wait_until(
        lambda: [d for d in node.deliveries() if d.attempts >= 2],
        240,
        interval=0.5,
        message=lambda: f"the send was never retried:\n{node.log()[-3000:]}",
    )
    print("stalled send:", delivery.last_error, "attempts", delivery.attempts)
    assert "watchdog" in delivery.last_error or "no answer" in delivery.last_error
    assert node.process.poll() is None  # the node is still serving


def test_worker_killed_mid_job_completes_after_restart_with_one_copy_in_pacs(tmp_path, pacs, node_factory):
    node = node_factory(pacs.dicom_port, lease_s=4)
    source = make_input(tmp_path, seed=30, shape=(1024, 832))
    assert storescu(node.port, source).returncode == 0
    wait_until(
        lambda: [j for j in node.joblog().list_jobs(limit=None) if str(j.status) == "processing"],
        60,
        message=lambda: f"the job was never claimed:\n{node.log()[-3000:]}",
    )
    pids = node.worker_pids()
    assert pids, "no worker process found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    [job] = node.wait_for_jobs(1, timeout=300)
    assert job.attempts >= 2
    pacs.wait_for(job.derived_sop_instance_uid)
    assert len(pacs.instances()) == 1
    assert "worker killed by signal 9 (SIGKILL)" in node.log()


def test_unknown_calling_ae_rejected_and_corrupt_dataset_refused_node_keeps_serving(
    tmp_path, pacs, node_factory, monkeypatch
):
    node = node_factory(pacs.dicom_port)
    source = make_input(tmp_path, seed=40)
    rejected = storescu(node.port, source, calling="STRANGER")
    print(rejected.stderr.strip()[-300:])
    assert rejected.returncode != 0
    assert "Calling AE Title Not Recognized" in rejected.stderr + rejected.stdout
    # A file whose meta header is right but whose dataset is garbage: a failure status, not a crash.
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomFileLike
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE

    from dicom_node.imaging import MG_FOR_PROCESSING

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MG_FOR_PROCESSING
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.9.7.1"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    corrupt = tmp_path / "corrupt.dcm"
    with corrupt.open("wb") as file:
        file.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(DicomFileLike(file), meta)
        file.write(b"\x08\x00\x18\x00UI\xff\xff" + bytes(range(256)) * 4)
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the file's bytes as they are
    ae = AE(ae_title="MAMMO1")
    ae.add_requested_context(MG_FOR_PROCESSING, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DOSENODE")
    assert assoc.is_established
    status = assoc.send_c_store(corrupt)
    assoc.release()
    print(f"corrupt dataset status 0x{status.Status:04X}")
    assert status.Status != 0x0000
    # The node keeps serving.
    assert storescu(node.port, source).returncode == 0
    [job] = node.wait_for_jobs(1)
    pacs.wait_for(job.derived_sop_instance_uid)


def node_command(node: RunningNode, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [NODE_BIN, *args, "--config", str(node.config_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=node.folder,
    )


def test_selftest_and_the_commands_for_it(tmp_path, pacs, node_factory):
    node = node_factory(pacs.dicom_port)
    result = node_command(node, "selftest", "--size", "256x208", "--timeout", "240")
    print(result.stdout, result.stderr[-500:])
    assert result.returncode == 0, result.stderr
    assert "selftest passed" in result.stdout
    for stage in ("queued", "decode", "restore", "derive", "forward", "total"):
        assert stage in result.stdout
    assert pacs.instances() == []  # the phantom never reaches PACS
    # The job log as IT sees it.
    listed = node_command(node, "jobs", "--json")
    assert listed.returncode == 0, listed.stderr
    jobs = json.loads(listed.stdout)
    assert len(jobs) == 1 and jobs[0]["status"] == "done" and jobs[0]["profile"] == "selftest"
    failed = node_command(node, "jobs", "--status", "failed")
    assert failed.returncode == 0 and failed.stdout.strip() == "", failed.stderr
    echo = node_command(node, "echo", "pacs")
    assert echo.returncode == 0 and "ok" in echo.stdout, echo.stderr
    check = node_command(node, "check-config")
    assert check.returncode == 0 and "valid" in check.stdout, check.stderr
    for args, fragment in (
        (("cancel", str(jobs[0]["id"])), "done"),
        (("retry", "999"), "999"),
        (("echo", "nowhere"), "no destination"),
        (("jobs", "--status", "lost"), "--status"),
    ):
        bad = node_command(node, *args)
        print(bad.stderr.strip())
        assert bad.returncode != 0 and fragment in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, args


def test_check_config_reports_an_unreachable_destination(tmp_path):
    config = write_config(tmp_path, free_port(), free_port())
    result = subprocess.run(
        [NODE_BIN, "check-config", "--config", str(config)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    print(result.stdout, result.stderr)
    assert result.returncode != 0 and "pacs" in result.stderr and "connection refused" in result.stdout


def test_embedded_defaults_serve_to_the_outbox_folder(tmp_path, monkeypatch):
    """The README's main command: `dicom-node serve` with no configuration at all."""
    monkeypatch.delenv("DICOM_NODE_CONFIG", raising=False)
    defaults = load_config()
    folder = tmp_path / "site"
    folder.mkdir()
    with open(folder / "node.log", "w") as log:
        process = subprocess.Popen([NODE_BIN, "serve"], stdout=log, stderr=log, cwd=folder)
    node_log = lambda: f":\n{(folder / 'node.log').read_text()[-3000:]}"  # noqa: E731
    try:
        wait_for_port(defaults.node.port, process, 60, "dicom-node serve", details=node_log)
        source = make_input(tmp_path, seed=50)
        result = storescu(defaults.node.port, source, calling="ANY_MODALITY")
        assert result.returncode == 0, result.stderr
        outbox = folder / "data" / "outbox"
        [written] = wait_until(
            lambda: list(outbox.glob("*.dcm")),
            120,
            interval=0.5,
            message=lambda: f"nothing reached {outbox}{node_log()}",
        )
        assert dcmread(written).SourceImageSequence[0].ReferencedSOPInstanceUID == dcmread(source).SOPInstanceUID
        assert dciodvfy_errors(written) == []
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(40)


# --- operations: bounded work, restart and stop, visible state, honest commands ----------------------


def tiny_input(folder: Path) -> Path:
    """An 8×8 MG For Processing image: valid DICOM, far too small to restore (BM3D crashed on it)."""
    from dicom_node.imaging import raw_mammogram_dataset, save_dataset

    path = folder / "tiny.dcm"
    save_dataset(raw_mammogram_dataset(np.full((8, 8), 900, dtype=np.uint16), seed=8), path)
    return path


def wait_for_processing(node: RunningNode, job_id: int, timeout: float = 120):
    """The job once a worker holds it (its lease owner names the worker's pid)."""
    return wait_until(
        lambda: (job := node.joblog().get_job(job_id)) and job.status == "processing" and job.lease_owner and job,
        timeout,
        interval=0.1,
        message=lambda: f"job {job_id} never processing:\n{node.log()[-3000:]}",
    )


def received_job(node: RunningNode, source: Path) -> int:
    assert storescu(node.port, source).returncode == 0
    return wait_until(lambda: [j.id for j in node.joblog().list_jobs(limit=1)], 30, message="no job")[0]


def test_a_tiny_image_is_one_line_offline_and_a_failed_job_online(tmp_path, pacs, node_factory, capsys):
    from dicom_node.cli import main

    tiny = tiny_input(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["process", str(tiny), str(tmp_path / "out.dcm"), "--dose-fraction", "0.5"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1 and "8×8 px" in err, err

    node = node_factory(pacs.dicom_port)
    job_id = received_job(node, tiny)
    [job] = node.wait_for_jobs(1, status="failed", timeout=120)
    assert job.attempts == 1 and "needs at least 64×64" in job.last_error  # refused before native code, once
    assert storescu(node.port, make_input(tmp_path, seed=30)).returncode == 0  # the node keeps serving
    wait_until(lambda: node.joblog().list_jobs(status="done"), 240, message=lambda: node.log()[-3000:])
    assert node.joblog().get_job(job_id).status == "failed"


def test_a_job_whose_worker_is_killed_every_time_fails_at_the_cap(tmp_path, pacs, node_factory):
    """The crash loop of issue 9: each attempt's worker dies by SIGSEGV; after max_attempts the job
    fails with the reason, and the node (with a restarted worker) serves the next image."""
    node = node_factory(pacs.dicom_port, max_attempts=2)
    job_id = received_job(node, make_input(tmp_path, seed=31, shape=(768, 624)))
    for _ in range(2):
        job = wait_for_processing(node, job_id)
        os.kill(int(job.lease_owner.rsplit(":", 1)[1]), signal.SIGSEGV)
        wait_until(lambda: node.joblog().get_job(job_id).status != "processing", 30, message="not given back")
    [failed] = node.wait_for_jobs(1, status="failed", timeout=60)
    assert failed.last_error == "worker killed by signal 11 (SIGSEGV) on 2 attempts"
    show = node_command(node, "jobs", "show", str(job_id))
    assert show.returncode == 0 and "handed-back" in show.stdout and "SIGSEGV" in show.stdout, show.stderr
    assert storescu(node.port, make_input(tmp_path, seed=32)).returncode == 0
    wait_until(lambda: node.joblog().list_jobs(status="done"), 240, message=lambda: node.log()[-3000:])


def test_a_killed_node_gives_back_its_job_at_once_on_restart(tmp_path, pacs, node_factory):
    """kill -9 of the node and its workers mid-restoration (a power cut): on restart the job is
    done within seconds, not after its 300 s lease."""
    node = node_factory(pacs.dicom_port, lease_s=300)
    job_id = received_job(node, make_input(tmp_path, seed=33, shape=(768, 624)))
    wait_for_processing(node, job_id)
    for pid in [*node.worker_pids(), node.process.pid]:
        os.kill(pid, signal.SIGKILL)
    node.process.wait(10)
    assert node.joblog().get_job(job_id).status == "processing"  # what the dead node left
    restarted = datetime.now(UTC)
    node.start()
    [job] = node.wait_for_jobs(1, timeout=200)
    handed_back = [e.at for e in node.joblog().events(job_id) if e.kind == "handed-back"]
    print(f"given back {(handed_back[0] - restarted).total_seconds():.1f} s after the restart")
    assert len(handed_back) == 1 and (handed_back[0] - restarted).total_seconds() < 15  # not after the 300 s lease
    assert job.attempts == 2 and "held when the node last stopped; given back to the queue" in node.log()


def test_sigterm_mid_restoration_hands_the_job_back(tmp_path, pacs, node_factory):
    node = node_factory(pacs.dicom_port, stop_grace_s=1, lease_s=300)
    job_id = received_job(node, make_input(tmp_path, seed=34, shape=(1024, 832)))
    wait_for_processing(node, job_id)
    node.process.send_signal(signal.SIGTERM)
    node.process.wait(60)
    job = node.joblog().get_job(job_id)
    assert (job.status, job.attempts, job.lease_owner) == ("received", 0, None)  # not counted: not its fault
    assert f"job {job_id}: not finished within 1 s of the stop; handed back to the queue" in node.log()
    node.start()
    node.wait_for_jobs(1, timeout=240)


def test_pacs_down_is_visible_and_retry_and_resend_send_now(tmp_path, node_factory):
    """PACS down: the failed send, its reason and its next attempt are in `jobs --json` and
    `jobs show`; PACS back, `retry` sends at once (not at the next automatic retry, minutes away);
    a PACS that lost the image gets it again with `resend`."""
    pacs = Orthanc(tmp_path / "orthanc")  # its port chosen, not started: PACS is down
    node = node_factory(pacs.dicom_port, retry_initial_s=600, send_timeout_s=3)
    try:
        job_id = received_job(node, make_input(tmp_path, seed=35))

        def failed_send():
            [delivery] = node.joblog().deliveries(job_id) or [None]
            return delivery if delivery and delivery.attempts >= 1 and delivery.status == "pending" else None

        wait_until(failed_send, 240, message=lambda: node.log()[-3000:])
        listed = node_command(node, "jobs", "--json")
        assert listed.returncode == 0, listed.stderr
        [job] = json.loads(listed.stdout, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
        [send] = job["deliveries"]
        assert job["status"] == "forwarding" and send["destination"] == "pacs" and send["attempts"] == 1
        assert send["last_error"] and send["next_attempt_at"], send
        table = node_command(node, "jobs")
        assert "SENDS" in table.stdout and "pacs derived: pending, 1 attempt, next" in table.stdout, table.stdout
        assert "job log:" in table.stderr
        show = node_command(node, "jobs", "show", str(job_id), "--json")
        events = json.loads(show.stdout)["events"]
        assert [e["kind"] for e in events][:3] == ["received", "claimed", "restored"]
        assert any(e["kind"] == "send-failed" and e["destination"] == "pacs" for e in events)

        pacs.start()
        retried = node_command(node, "retry", str(job_id))
        assert retried.returncode == 0 and "sends due now: derived to pacs" in retried.stdout, retried.stderr
        [job] = node.wait_for_jobs(1, timeout=60)  # well before the automatic retry in 600 s
        derived = pacs.wait_for(job.derived_sop_instance_uid)
        again = node_command(node, "retry", str(job_id))
        assert again.returncode == 1 and "nothing to retry" in again.stderr

        pacs.request(f"/instances/{derived}", method="DELETE")  # PACS lost it
        assert pacs.find(job.derived_sop_instance_uid) is None
        resent = node_command(node, "resend", str(job_id))
        assert resent.returncode == 0 and "queued to pacs" in resent.stdout, resent.stderr
        pacs.wait_for(job.derived_sop_instance_uid)
        node.wait_for_jobs(1, timeout=60)
        for args, code, fragment in (
            (("resend", str(job_id), "--to", "nowhere"), 2, "no destination 'nowhere'"),
            (("cancel", str(job_id)), 1, "nothing to cancel"),
            (("reprocess", str(job_id)), 0, "queued for processing again"),
        ):
            result = node_command(node, *args)
            assert result.returncode == code and fragment in (result.stdout + result.stderr), (args, result)
        node.wait_for_jobs(1, timeout=240)  # reprocessed and sent once more
    finally:
        pacs.stop()


def test_a_restoration_past_its_time_limit_is_stopped_and_counted(tmp_path, pacs, node_factory):
    node = node_factory(pacs.dicom_port, timeout_s=2, max_attempts=1)
    job_id = received_job(node, make_input(tmp_path, seed=36, shape=(1024, 832)))
    [job] = node.wait_for_jobs(1, status="failed", timeout=120)
    assert (
        job.last_error.startswith("restoration ran past the 2 s limit") and "gave up after 1 attempts" in job.last_error
    )
    wait_until(lambda: "restarting it" in node.log(), 30, message=lambda: node.log()[-2000:])  # the worker stopped
    assert node.joblog().events(job_id)[-1].kind == "attempt-failed"


def test_the_service_unit_waits_longer_than_the_workers_grace():
    from dicom_node.config import WorkerSettings

    unit = (Path(__file__).resolve().parents[1] / "deploy" / "dicom-node.service").read_text()
    [timeout] = [line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("TimeoutStopSec=")]
    assert "KillMode=mixed" in unit and float(timeout) > WorkerSettings().stop_grace_s + 10


def test_jobs_names_its_job_log_and_never_creates_an_empty_one(tmp_path, monkeypatch, capsys):
    from dicom_node.cli import main

    site = tmp_path / "site"
    site.mkdir()
    config = write_config(site, free_port(), free_port())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(SystemExit) as info:
        main(["jobs", "--config", str(config)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"no job log at {site / 'data' / 'joblog.sqlite'}" in err, err
    assert not list(elsewhere.iterdir()) and not (site / "data").exists()

    JobLog(load_config(config).database_url).close()  # as a node that ran once leaves it
    with pytest.raises(SystemExit) as info:
        main(["jobs", "--config", str(config)])
    captured = capsys.readouterr()
    assert info.value.code == 0 and f"job log: {site / 'data' / 'joblog.sqlite'}" in captured.err


def test_for_presentation_is_passed_through_unchanged_when_the_profile_says_so(tmp_path, pacs, node_factory):
    """Sites that send everything to one node: a profile passes For Presentation through to its
    destinations byte for byte, never restored; without `pass_through` it is refused at negotiation
    (tests/test_receive.py)."""
    from dicom_node.imaging import raw_mammogram_dataset, save_dataset
    from dicom_node.imaging.read import MG_FOR_PRESENTATION

    node = node_factory(pacs.dicom_port, pass_through=(MG_FOR_PRESENTATION,))
    ds = raw_mammogram_dataset(np.full((96, 80), 700, dtype=np.uint16), seed=41)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MG_FOR_PRESENTATION
    save_dataset(ds, source := tmp_path / "presentation.dcm")
    job_id = received_job(node, source)
    [job] = node.wait_for_jobs(1, timeout=60)
    assert job.id == job_id and job.derived_path is None and job.pipeline is None  # never restored
    arrived = dcmread(io.BytesIO(pacs.file(pacs.wait_for(str(ds.SOPInstanceUID)))))
    assert arrived.PixelData == ds.PixelData and arrived.SOPClassUID == MG_FOR_PRESENTATION
    assert [e.kind for e in node.joblog().events(job_id)][:2] == ["received", "passed-through"]
