"""Faults a node between the modality and PACS must come through without losing or duplicating an
image, each against real peers on loopback: the whole node killed (-9) while images stream in,
PACS refusing (for now or for good) or answering that it has the image already, the spool's disk
full, the job log locked. (PACS down for minutes and PACS stalling mid-transfer: tests/test_node.py.)
"""

from __future__ import annotations

import random
import re
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import Verification

from dicom_node.config import Config, parse_config
from dicom_node.forward.dispatch import Dispatcher
from dicom_node.imaging import MG_FOR_PROCESSING, raw_mammogram_dataset, save_dataset
from dicom_node.joblog import JobLog
from dicom_node.receive import StorageSCP

from nodes import RunningNode, make_input, write_config
from peers import Orthanc, free_port, require, wait_until

SUCCESS = "Received Store Response (Success)"


# The whole node killed while a modality streams images


def stream(port: int, files: list[Path], log: Path) -> subprocess.Popen:
    """One modality association sending `files` (storescu -v names each file and its answer)."""
    binary = require("storescu", "dcmtk")
    with open(log, "w") as out:
        return subprocess.Popen(
            [binary, "-v", "-aet", "MAMMO1", "-aec", "DOSENODE", "127.0.0.1", str(port), *map(str, files)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def acknowledged(log: Path) -> set[Path]:
    """The files storescu saw answered with Success: what the modality may delete."""
    done, current = set(), None
    for line in log.read_text().splitlines():
        if match := re.search(r"Sending file: (\S+)", line):
            current = Path(match.group(1))
        elif SUCCESS in line and current is not None:
            done.add(current)
            current = None
    return done


def test_kill_9_of_the_whole_node_never_loses_nor_duplicates_an_acknowledged_image(tmp_path: Path) -> None:
    """60 images over 4 associations at a time; the node (receiver, workers, forwarder) is killed
    with SIGKILL at three random moments (two mid-stream, one mid-restoration or mid-send) and
    started again; like a real modality, the sender sends again what it never saw acknowledged. In the end every image is in Orthanc exactly
    once, restored, and nothing is there that the modality was not told was stored."""
    pacs = Orthanc(tmp_path / "orthanc").start()
    node_dir = tmp_path / "node"
    node_dir.mkdir()
    port = free_port()
    node = RunningNode(
        node_dir, write_config(node_dir, port, pacs.dicom_port, lease_s=5, retry_initial_s=1), port
    ).start()
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    files = [make_input(inputs, seed, shape=(128, 104)) for seed in range(60)]
    moments = random.Random(20261201)
    acked: set[Path] = set()

    def send_what_is_not_acknowledged(round_: str, associations: int) -> list[tuple[subprocess.Popen, Path]]:
        waiting = [f for f in files if f not in acked]
        logs = [tmp_path / f"{round_}-{i}.log" for i in range(associations)]
        return [
            (stream(port, waiting[i::associations], log), log) for i, log in enumerate(logs) if waiting[i::associations]
        ]

    try:
        # Twice mid-stream (after a random number of this round's images were acknowledged), then
        # once after the stream, at a random moment of restoring and forwarding.
        for kill in range(3):
            streams = send_what_is_not_acknowledged(f"kill{kill}", 4)
            if kill < 2:
                target = moments.randint(1, len(files) - len(acked) - 1)
                wait_until(
                    lambda streams=streams, target=target: sum(len(acknowledged(log)) for _, log in streams) >= target,
                    60,
                    interval=0.02,
                    message="the stream stalled",
                )
            else:
                for process, _ in streams:
                    process.wait(60)
                time.sleep(moments.uniform(0.0, 3.0))
            node.kill()
            for process, log in streams:
                process.wait(60)
                acked |= acknowledged(log)
            print(f"kill {kill + 1}: {len(acked)} of {len(files)} acknowledged so far")
            node.start()
        for process, log in send_what_is_not_acknowledged("final", 2):
            assert process.wait(120) == 0, log.read_text()[-2000:]
            acked |= acknowledged(log)
        assert acked == set(files), "the modality still holds unacknowledged images"

        jobs = node.wait_for_jobs(len(files), timeout=400)
        assert len(jobs) == len(files), "an image was recorded twice"
        sources = {dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
        assert {job.sop_instance_uid for job in jobs} == sources

        def stored() -> list[str]:
            return pacs.instances() if len(pacs.instances()) >= len(files) else []

        instances = wait_until(stored, 120, interval=1, message=lambda: f"Orthanc has {len(pacs.instances())}")
        assert len(instances) == len(files)  # one derived instance per image, none twice
        referenced = [pacs.tags(i)["SourceImageSequence"][0]["ReferencedSOPInstanceUID"] for i in instances]
        assert sorted(referenced) == sorted(sources)  # each image once, and only images the modality sent
        assert all(str(d.status) == "sent" for d in node.deliveries())
    finally:
        node.stop()
        pacs.stop()


# PACS refusing, for now or for good, or having the image already


class ScriptedPacs:
    """A pynetdicom Storage SCP answering each C-STORE with the next status of its script."""

    def __init__(self, statuses: list[int]):
        self.statuses, self.answered = list(statuses), []
        ae = AE(ae_title="PACS")
        ae.add_supported_context(MG_FOR_PROCESSING, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        self.port = free_port()
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def _store(self, _event: evt.Event) -> int:
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        self.answered.append(status)
        return status


@pytest.fixture
def scripted_pacs() -> Iterator[type[ScriptedPacs]]:
    started: list[ScriptedPacs] = []

    def start(statuses: list[int]) -> ScriptedPacs:
        pacs = ScriptedPacs(statuses)
        started.append(pacs)
        return pacs

    yield start  # type: ignore[misc]
    for pacs in started:
        pacs.server.shutdown()


def forwarding_node(tmp_path: Path, pacs_port: int, **destination: object) -> tuple[Config, JobLog, int]:
    """A job log holding one received image to pass to PACS unchanged, and the configuration to send it."""
    config = parse_config(
        {
            "node": {"ae_title": "DOSENODE", "data_dir": str(tmp_path / "data")},
            "destinations": [
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port, **destination}
            ],
            "retry": {"initial_s": 0.05, "multiplier": 1, "jitter": 0, "max_delay_s": 0.05, "max_age_h": 1},
        }
    )
    image = tmp_path / "mg.dcm"
    save_dataset(raw_mammogram_dataset(np.full((96, 80), 900, np.uint16), seed=5), image)
    joblog = JobLog(config.database_url)
    ds = dcmread(image, stop_before_pixels=True)
    job_id = joblog.record_received(
        sop_instance_uid=ds.SOPInstanceUID,
        study_instance_uid=ds.StudyInstanceUID,
        series_instance_uid=ds.SeriesInstanceUID,
        sop_class_uid=ds.SOPClassUID,
        transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
        calling_ae="MAMMO1",
        called_ae="DOSENODE",
        peer_host="127.0.0.1",
        station_name=None,
        detector_serial=None,
        profile="pass",
        input_path=str(image),
        input_sha256="0" * 64,
        input_bytes=image.stat().st_size,
        pass_through_to=["pacs"],
    )
    return config, joblog, job_id


def dispatch_until_settled(config: Config, joblog: JobLog, job_id: int) -> str:
    dispatcher = Dispatcher(config, joblog)

    def settled() -> str | None:
        dispatcher.dispatch_due()
        job = joblog.get_job(job_id)
        return str(job.status) if job is not None and str(job.status) in ("done", "failed") else None

    return wait_until(settled, 30, interval=0.1, message="the send never settled")


@pytest.mark.parametrize(
    ("statuses", "options", "outcome", "attempts"),
    [
        ([0xA700, 0xA700, 0x0000], {}, "done", 3),  # out of resources: retried until PACS takes it
        ([0xC000], {}, "failed", 1),  # cannot understand: refused for good, not retried
        ([0x0111], {"duplicate_is_delivered": True}, "done", 1),  # it has the image already
        ([0x0111], {}, "failed", 1),  # ... unless the destination says otherwise
    ],
    ids=["0xA700-then-success", "0xC000", "0x0111-counted-delivered", "0x0111-refused"],
)
def test_pacs_answers_decide_retry_failure_or_delivery(
    tmp_path: Path, scripted_pacs, statuses: list[int], options: dict, outcome: str, attempts: int
) -> None:
    pacs = scripted_pacs(statuses)
    config, joblog, job_id = forwarding_node(tmp_path, pacs.port, **options)
    assert dispatch_until_settled(config, joblog, job_id) == outcome
    [delivery] = joblog.deliveries(job_id)
    assert delivery.attempts == attempts == len(pacs.answered)
    if outcome == "failed":
        assert f"0x{statuses[-1]:04X}" in (joblog.get_job(job_id).last_error or "")
    history = [event.kind for event in joblog.events(job_id)]
    assert history.count("send-failed") == attempts - (outcome == "done")


# The spool's disk full


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MB tmpfs: a real file system that fills up (mounting needs root, as CI runs)."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def receiver(tmp_path: Path, data_dir: Path, joblog: JobLog, min_free_disk_mb: float) -> StorageSCP:
    config = parse_config(
        {
            "node": {
                "ae_title": "DOSENODE",
                "bind": "127.0.0.1",
                "data_dir": str(data_dir),
                "min_free_disk_mb": min_free_disk_mb,
            },
            "sources": [{"ae_title": "MAMMO1", "profile": "half"}],
            "profiles": {"half": {"pipeline": "gat-bm3d", "dose_fraction": 0.5}},
        }
    )
    scp = StorageSCP(config, joblog, port=0)
    scp.start()
    return scp


def store(port: int, path: Path) -> tuple[int | None, str]:
    """(DIMSE status or None when the association was refused, storescu's output)."""
    binary = require("storescu", "dcmtk")
    result = subprocess.run(
        [binary, "-d", "-aet", "MAMMO1", "-aec", "DOSENODE", "127.0.0.1", str(port), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    status = re.search(r"DIMSE Status\s*: 0x([0-9a-f]{4})", output)
    return (int(status.group(1), 16) if status else None), output


def image(folder: Path, seed: int, shape: tuple[int, int] = (512, 416)) -> Path:
    path = folder / f"mg-{seed}.dcm"
    pixels = np.random.default_rng(seed).integers(40, 1 << 14, shape, dtype=np.uint16)
    save_dataset(raw_mammogram_dataset(pixels, seed=seed), path)
    return path


def test_a_full_disk_answers_out_of_resources_leaves_nothing_half_written_and_recovers(
    tmp_path: Path, small_disk: Path
) -> None:
    joblog = JobLog(f"sqlite:///{tmp_path / 'joblog.sqlite'}")  # on another file system
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    big = image(inputs, 1)  # 416 KB of pixels
    filler = small_disk / "filler"
    scp = receiver(tmp_path, small_disk, joblog, min_free_disk_mb=0)
    try:
        filler.write_bytes(b"\0" * (4 * 1024 * 1024 - 200 * 1024))  # 200 KB left: the write runs out
        status, output = store(scp.port, big)
        assert status == 0xA700, output[-2000:]
        assert joblog.list_jobs() == []  # never acknowledged, never queued
        spooled = [p for p in (small_disk / "spool").rglob("*") if p.is_file()]
        assert spooled == [], f"half-written files left: {spooled}"
    finally:
        scp.stop()
    # Under the watermark, new associations are refused (transient) before any data moves.
    scp = receiver(tmp_path, small_disk, joblog, min_free_disk_mb=1)
    try:
        status, output = store(scp.port, big)
        assert status is None and "Association Rejected" in output and "Transient" in output, output[-2000:]
        filler.unlink()  # space comes back
        status, output = store(scp.port, big)
        assert status == 0x0000, output[-2000:]
        [job] = joblog.list_jobs()
        assert Path(job.input_path).read_bytes() and Path(job.input_path).parent.parent == small_disk / "spool"
    finally:
        scp.stop()
        joblog.close()


# The job log locked


def test_a_locked_job_log_answers_out_of_resources_never_success(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'joblog.sqlite'}"
    joblog = JobLog(url, busy_timeout_s=1)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    scp = receiver(tmp_path, tmp_path / "data", joblog, min_free_disk_mb=0)
    locker = sqlite3.connect(tmp_path / "joblog.sqlite", isolation_level=None, check_same_thread=False)
    try:
        locker.execute("BEGIN EXCLUSIVE")  # e.g. a backup or a stuck command holding the lock
        started = time.monotonic()
        status, output = store(scp.port, image(inputs, 2, (96, 80)))
        waited = time.monotonic() - started
        assert status == 0xA700, output[-2000:]
        assert waited < 30, f"the answer took {waited:.1f} s"
        locker.execute("ROLLBACK")
        assert joblog.list_jobs() == []
        assert [p for p in scp.spool.root.rglob("*.dcm")] == []  # the spooled copy went with the failure
        # A lock held for less than busy_timeout_s only delays the answer.
        locker.execute("BEGIN EXCLUSIVE")
        threading.Timer(0.5, lambda: locker.execute("ROLLBACK")).start()
        status, output = store(scp.port, image(inputs, 3, (96, 80)))
        assert status == 0x0000, output[-2000:]
        assert len(joblog.list_jobs()) == 1
    finally:
        scp.stop()
        locker.close()
        joblog.close()
