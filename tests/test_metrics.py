"""Prometheus metrics: the /metrics text of `build_registry`, parsed with prometheus-client's own parser.

A job log in tmp_path holds jobs in every state, with known stage times, retries and QC flags; the
receiver's counters are driven by real associations with the storage SCP (pynetdicom as the peer).
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import update

from dicom_node.config import Config, load_config
from dicom_node.imaging import MG_FOR_PROCESSING, raw_mammogram_dataset
from dicom_node.joblog import JobLog
from dicom_node.joblog.tables import Job
from dicom_node.qa.metrics import STAGE_BUCKETS_S, build_registry
from dicom_node.receive import StorageSCP
from dicom_node.receive.counters import status_class

from peers import wait_until

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(config: Config, joblog: JobLog) -> Samples:
    """Every sample of one scrape: (name, labels) → value, from the exposition text."""
    text = generate_latest(build_registry(config, joblog)).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, /, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def job_fields(n: int, station: str = "MG1") -> dict:
    return dict(
        sop_instance_uid=f"1.2.826.0.1.3680043.8.498.{n}",
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
        sop_class_uid=MG_FOR_PROCESSING,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        calling_ae="MAMMO",
        called_ae="DOSENODE",
        peer_host="127.0.0.1",
        station_name=station,
        detector_serial="SIM-0001",
        profile="default",
        input_path=f"/spool/{n}.dcm",
        input_sha256=f"{n:064x}",
        input_bytes=1000,
    )


def flag(figure: str) -> dict:
    return {"figure": figure, "value": 9.0, "min": 0.0, "max": 1.0, "message": f"{figure} 9 above 1"}


def restore(
    joblog: JobLog,
    n: int,
    stages: dict[str, float],
    *,
    deliveries: list[tuple[str, str]],
    qc_flags: list[dict] = (),
    hold: bool = False,
    fail_first: bool = False,
) -> int:
    """Receive, claim and restore one job, with the given stage durations; `fail_first`: a retried first attempt."""
    job_id = joblog.record_received(**job_fields(n))
    if fail_first:
        assert joblog.claim_job("w1", 60).id == job_id
        assert joblog.job_failed(job_id, "w1", "GPU busy", retry_at=datetime.now(UTC) - timedelta(seconds=1))
    assert joblog.claim_job("w1", 60).id == job_id
    for stage, seconds in stages.items():
        joblog.record_stage(job_id, stage, seconds)
    assert joblog.job_processed(
        job_id,
        "w1",
        derived_path=f"/derived/{n}.dcm",
        derived_sop_instance_uid=f"2.25.{n}",
        qc={},
        timings={"total": sum(stages.values())},
        device="cpu",
        model_digest=None,
        deliveries=deliveries,
        qc_flags=qc_flags,
        hold=hold,
    )
    return job_id


@pytest.fixture
def config(tmp_path: Path) -> Config:
    path = tmp_path / "node.toml"
    path.write_text('[node]\ndata_dir = "data"\nmin_free_disk_mb = 5\n')
    return load_config(path)


@pytest.fixture
def joblog(config: Config) -> Iterator[JobLog]:
    log = JobLog(config.database_url)
    yield log
    log.close()


@pytest.fixture
def busy_log(joblog: JobLog) -> JobLog:
    """One job in every state but cancelled: done, held, failed twice, received, processing, forwarding.

    A: done, sent in 0.7 s; B: first attempt failed and retried, two QC flags, held; C: failed for
    good; D: received an hour ago, waiting; E: processing; F: a send retried then given up;
    G: forwarding, one QC flag, a restore time past the last bucket.
    """
    now = datetime.now(UTC)
    a = restore(joblog, 1, {"decoded": 0.2, "restored": 3.0, "derived": 0.4}, deliveries=[("pacs", "derived")])
    delivery = joblog.claim_delivery("fw", 60)
    assert delivery.job_id == a
    joblog.delivery_sent(delivery.id, status=0, send_s=0.7)

    restore(
        joblog,
        2,
        {"decoded": 0.04, "restored": 45.0, "derived": 0.5},
        deliveries=[("pacs", "derived")],
        qc_flags=[flag("snr_gain"), flag("mean_ratio")],
        hold=True,
        fail_first=True,
    )

    c = joblog.record_received(**job_fields(3, station="MG2"))
    assert joblog.claim_job("w1", 60).id == c
    assert joblog.job_failed(c, "w1", "no noise parameters for detector X", retry_at=None)

    e = joblog.record_received(**job_fields(5))
    assert joblog.claim_job("w2", 600).id == e
    f = restore(joblog, 6, {"restored": 2.0}, deliveries=[("pacs", "derived")])
    delivery = joblog.claim_delivery("fw", 60)
    assert delivery.job_id == f
    joblog.delivery_failed(delivery.id, error="refused", status=None, retry_at=now - timedelta(seconds=1))
    delivery = joblog.claim_delivery("fw", 60)
    assert delivery.job_id == f
    joblog.delivery_failed(delivery.id, error="refused", status=None, retry_at=None)

    restore(joblog, 7, {"restored": 700.0}, deliveries=[("pacs", "derived")], qc_flags=[flag("mean_ratio")])

    d = joblog.record_received(**job_fields(4, station="MG2"))
    with joblog.engine.begin() as connection:
        connection.execute(update(Job).where(Job.id == d).values(received_at=now - timedelta(hours=1)))
    return joblog


def test_job_log_counters_and_queue(config: Config, busy_log: JobLog) -> None:
    samples = scrape(config, busy_log)
    assert value(samples, "dicom_node_joblog_up") == 1
    assert value(samples, "dicom_node_instances_received_total") == 7
    assert value(samples, "dicom_node_instances_restored_total") == 4  # A, B, F, G
    assert value(samples, "dicom_node_instances_forwarded_total", destination="pacs", kind="derived") == 1
    assert value(samples, "dicom_node_instances_failed_total", stage="processing") == 1  # C
    assert value(samples, "dicom_node_instances_failed_total", stage="sending") == 1  # F
    assert value(samples, "dicom_node_retries_total", stage="processing") == 1  # B's second claim
    assert value(samples, "dicom_node_retries_total", stage="sending") == 1  # F's first send
    assert value(samples, "dicom_node_qc_flagged_total") == 2  # B, G
    assert value(samples, "dicom_node_qc_flagged_jobs", figure="snr_gain") == 1
    assert value(samples, "dicom_node_qc_flagged_jobs", figure="mean_ratio") == 2
    assert value(samples, "dicom_node_job_events_total", kind="send-failed") == 2
    assert value(samples, "dicom_node_job_events_total", kind="claimed") == 7  # A, B twice, C, E, F, G

    jobs = {status: value(samples, "dicom_node_jobs", status=status) for status in ("received", "processing")}
    jobs |= {status: value(samples, "dicom_node_jobs", status=status) for status in ("forwarding", "held", "done")}
    jobs |= {status: value(samples, "dicom_node_jobs", status=status) for status in ("failed", "cancelled")}
    assert jobs == {
        "received": 1,
        "processing": 1,
        "forwarding": 1,
        "held": 1,
        "done": 1,
        "failed": 2,
        "cancelled": 0,
    }
    sends = {s: value(samples, "dicom_node_deliveries", status=s) for s in ("sent", "held", "failed", "pending")}
    assert sends == {"sent": 1, "held": 1, "failed": 1, "pending": 1}

    # D was received an hour ago and still waits; the other queue states hold jobs of a moment ago.
    assert 3600 <= value(samples, "dicom_node_oldest_job_age_seconds", status="received") < 3700
    for status in ("processing", "forwarding", "held"):
        assert 0 < value(samples, "dicom_node_oldest_job_age_seconds", status=status) < 60


def test_stage_histograms_are_cumulative_and_match_the_stage_times(config: Config, busy_log: JobLog) -> None:
    samples = scrape(config, busy_log)
    times = {"decode": [0.2, 0.04], "restore": [3.0, 45.0, 2.0, 700.0], "derive": [0.4, 0.5], "send": [0.7]}
    for stage, seconds in times.items():
        buckets = [
            value(samples, "dicom_node_stage_duration_seconds_bucket", stage=stage, le=repr(float(le)))
            for le in STAGE_BUCKETS_S
        ]
        assert buckets == [sum(s <= le for s in seconds) for le in STAGE_BUCKETS_S], stage
        assert buckets == sorted(buckets)
        infinite = value(samples, "dicom_node_stage_duration_seconds_bucket", stage=stage, le="+Inf")
        assert infinite == value(samples, "dicom_node_stage_duration_seconds_count", stage=stage) == len(seconds)
        assert value(samples, "dicom_node_stage_duration_seconds_sum", stage=stage) == pytest.approx(sum(seconds))


def test_an_empty_job_log_has_zero_counters_and_no_queue(config: Config, joblog: JobLog) -> None:
    samples = scrape(config, joblog)
    assert value(samples, "dicom_node_instances_received_total") == 0
    assert value(samples, "dicom_node_jobs", status="received") == 0
    assert value(samples, "dicom_node_oldest_job_age_seconds", status="received") == 0
    assert value(samples, "dicom_node_stage_duration_seconds_count", stage="restore") == 0
    assert not [key for key in samples if key[0] == "dicom_node_instances_forwarded_total"]


def test_disk_free_of_the_data_folder(config: Config, joblog: JobLog) -> None:
    samples = scrape(config, joblog)
    path = str(config.data_dir)
    free = value(samples, "dicom_node_disk_free_bytes", path=path)
    assert 0 < free <= value(samples, "dicom_node_disk_total_bytes", path=path)
    assert value(samples, "dicom_node_disk_min_free_bytes") == 5 * 2**20


def test_a_job_log_that_cannot_be_read_is_reported_not_fatal(
    config: Config, joblog: JobLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken():
        raise ConnectionError("database is down")

    monkeypatch.setattr(joblog, "reading", broken)
    samples = scrape(config, joblog)
    assert value(samples, "dicom_node_joblog_up") == 0
    assert not [key for key in samples if key[0] == "dicom_node_instances_received_total"]
    assert value(samples, "dicom_node_disk_free_bytes", path=str(config.data_dir)) > 0


class FakeNvml(types.ModuleType):
    """The part of nvidia-ml-py's `pynvml` the metrics use: two GPUs, or an init that fails."""

    def __init__(self, init_error: Exception | None = None) -> None:
        super().__init__("pynvml")
        self.init_error = init_error
        self.shut_down = False

    def nvmlInit(self) -> None:
        if self.init_error:
            raise self.init_error

    def nvmlShutdown(self) -> None:
        self.shut_down = True

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return b"NVIDIA H200"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> types.SimpleNamespace:
        return types.SimpleNamespace(used=(handle + 1) * 2**30, total=141 * 2**30)


def test_gpu_memory_from_nvml(config: Config, joblog: JobLog, monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    samples = scrape(config, joblog)
    assert value(samples, "dicom_node_gpu_memory_used_bytes", gpu="1", name="NVIDIA H200") == 2 * 2**30
    assert value(samples, "dicom_node_gpu_memory_total_bytes", gpu="0", name="NVIDIA H200") == 141 * 2**30
    assert nvml.shut_down


@pytest.mark.parametrize(
    "nvml", [None, FakeNvml(RuntimeError("NVML Shared Library Not Found"))], ids=["absent", "no-driver"]
)
def test_no_gpu_metrics_without_nvml(config: Config, joblog: JobLog, monkeypatch: pytest.MonkeyPatch, nvml) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", nvml)  # None: `import pynvml` raises ImportError
    samples = scrape(config, joblog)
    assert not [key for key in samples if key[0].startswith("dicom_node_gpu_")]
    assert value(samples, "dicom_node_joblog_up") == 1


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (0x0000, "success"),
        (0xB000, "warning"),
        (0xA700, "refused"),
        (0x0122, "refused"),
        (0xA900, "error"),
        (0xC000, "error"),
    ],
)
def test_store_status_classes(status: int, expected: str) -> None:
    assert status_class(status) == expected


# Receiver counters, driven by real associations


@pytest.fixture
def scp(tmp_path: Path, joblog: JobLog) -> Iterator[tuple[StorageSCP, Config]]:
    path = tmp_path / "scp.toml"
    path.write_text(
        '[node]\nae_title = "DOSENODE"\nbind = "127.0.0.1"\ndata_dir = "data"\nmin_free_disk_mb = 0\n'
        '[[sources]]\nae_title = "MAMMO1"\nprofile = "half"\n'
        '[profiles.half]\npipeline = "gat-bm3d"\ndose_fraction = 0.5\n'
    )
    config = load_config(path)
    server = StorageSCP(config, joblog, port=0)
    server.start()
    try:
        yield server, config
    finally:
        server.stop()


def associate(port: int, calling: str) -> object:
    ae = AE(ae_title=calling)
    ae.add_requested_context(MG_FOR_PROCESSING, ExplicitVRLittleEndian)
    return ae.associate("127.0.0.1", port, ae_title="DOSENODE")


def test_receiver_counts_associations_and_stores(scp, joblog: JobLog) -> None:
    server, config = scp

    def receiver() -> dict[str, float]:
        samples = scrape(config, joblog)
        keys = {
            "accepted": ("dicom_node_associations_accepted_total", {}),
            "unknown_ae": ("dicom_node_associations_rejected_total", {"reason": "calling_ae_not_recognised"}),
            "limit": ("dicom_node_associations_rejected_total", {"reason": "association_limit"}),
            "aborted": ("dicom_node_associations_aborted_total", {}),
            **{s: ("dicom_node_cstore_requests_total", {"status": s}) for s in ("success", "refused", "error")},
        }
        return {key: value(samples, name, **labels) for key, (name, labels) in keys.items()}

    before = receiver()
    good = raw_mammogram_dataset(np.full((96, 80), 900, np.uint16), seed=1)
    bad = raw_mammogram_dataset(np.full((96, 80), 900, np.uint16), seed=2)
    del bad.PixelData  # refused 0xC000: nothing to restore

    assoc = associate(server.port, "MAMMO1")
    assert assoc.is_established
    assert assoc.send_c_store(good).Status == 0x0000
    assert assoc.send_c_store(bad).Status == 0xC000
    assoc.release()

    stranger = associate(server.port, "STRANGER")
    assert stranger.is_rejected

    aborted = associate(server.port, "MAMMO1")
    assert aborted.is_established
    aborted.abort()

    wait_until(lambda: receiver()["aborted"] > before["aborted"], timeout=10, message="the abort was not counted")
    after = receiver()
    assert {key: after[key] - before[key] for key in after} == {
        "accepted": 2,
        "unknown_ae": 1,
        "limit": 0,
        "aborted": 1,
        "success": 1,
        "refused": 0,
        "error": 1,
    }
    assert value(scrape(config, joblog), "dicom_node_instances_received_total") == 1
