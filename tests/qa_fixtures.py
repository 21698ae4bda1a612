"""A small job log for the dashboard's tests: jobs in several states, stations, detectors and days,
one QC-flagged and held, their thumbnails, and an evaluated phantom QA session."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from sqlalchemy import update

from dicom_node.config import Config, parse_config
from dicom_node.imaging.thumbnails import thumbnail_dir, write_thumbnails
from dicom_node.joblog import JobLog, QaSessionStatus
from dicom_node.joblog.tables import Job, QaSession
from dicom_node.qa.auth import hash_password

PASSWORDS = {"quinn": "qa-password-1", "ada": "admin-password-1"}
GOOD_QC = {
    "breast_fraction": 0.4,
    "calibration_gain_ratio": 1.02,
    "noise_after": 1.02,
    "mean_ratio": 1.001,
    "method_noise_structure": 0.03,
    "saturated_fraction": 0.0,
    "snr_before": 12.0,
    "snr_after": 16.5,
}
FLAG = {"figure": "noise_after", "value": 1.6, "min": 0.75, "max": 1.3, "message": "noise_after 1.6 is above 1.3"}


@dataclass(frozen=True)
class Jobs:
    done: int  # MG1 / MAMMO1, SN42, sent to pacs, thumbnails; 2026-11-20
    held: int  # MG2 / MAMMO2, SN77, profile hold, QC-flagged and held, thumbnails; 2026-11-25
    failed: int  # MG1 / MAMMO1, SN99, failed for good, no thumbnails; 2026-11-25
    queued: int  # MG2 / MAMMO2, SN77, received and waiting; 2026-11-28
    forwarding: int  # MG1 / MAMMO1, SN42, a send pending, a NaN QC figure; 2026-11-28


def dashboard_config(data_dir: Path, session_minutes: float = 60) -> Config:
    """A configuration with the dashboard on, a qa user `quinn` and an admin `ada` (PASSWORDS), and
    the QC thresholds the tests read on the pages (not the defaults, which may be tuned)."""
    return parse_config(
        {
            "node": {"data_dir": str(data_dir)},
            "destinations": [{"name": "pacs", "folder": str(data_dir / "pacs")}, {"name": "archive", "folder": "a"}],
            "qc": {"thresholds": {"noise_after": {"min": 0.75, "max": 1.3}, "mean_ratio": {"min": 0.98, "max": 1.02}}},
            "dashboard": {
                "enabled": True,
                "session_minutes": session_minutes,
                "users": {
                    "quinn": {"role": "qa", "password_hash": hash_password(PASSWORDS["quinn"])},
                    "ada": {"role": "admin", "password_hash": hash_password(PASSWORDS["ada"])},
                },
            },
        }
    )


def _received(joblog: JobLog, n: int, station: str, detector: str, profile: str = "default") -> int:
    return joblog.record_received(
        sop_instance_uid=f"1.2.826.0.1.3680043.8.498.{n}",
        study_instance_uid=f"1.2.826.0.1.3680043.8.498.{n}.1",
        series_instance_uid=f"1.2.826.0.1.3680043.8.498.{n}.2",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2.1",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        calling_ae=f"MAMMO{station[-1]}",
        called_ae="DOSENODE",
        peer_host="10.0.0.5",
        station_name=station,
        detector_serial=detector,
        profile=profile,
        input_path=f"/spool/{n}.dcm",
        input_sha256=f"{n:064x}",
        input_bytes=1000 + n,
    )


def _process(joblog: JobLog, job_id: int, qc: dict, flags: list[dict] = (), hold: bool = False) -> None:
    job = joblog.claim_job("w1", 60)
    assert job is not None and job.id == job_id
    for stage, seconds in (("decoded", 0.4), ("restored", 3.2), ("derived", 0.6)):
        joblog.record_stage(job_id, stage, seconds)
    assert joblog.job_processed(
        job_id,
        "w1",
        derived_path=f"/outbox/{job_id}.dcm",
        derived_sop_instance_uid=f"2.25.{job_id}",
        qc=qc,
        timings={"gat": 0.2, "bm3d": 2.8, "total": 3.2},
        device="cpu",
        model_digest=None,
        deliveries=[("pacs", "derived")],
        qc_flags=flags,
        hold=hold,
    )


def _views(data_dir: Path, job_id: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:96, 0:80]
    after = 200.0 + 3000.0 * np.exp(-((rows - 48) ** 2 + (cols - 10) ** 2) / 1500.0)
    before = after + rng.normal(0, 30, after.shape)
    write_thumbnails(thumbnail_dir(data_dir, job_id), before, after, 100.0)


def fill_joblog(joblog: JobLog, data_dir: Path) -> Jobs:
    """The jobs of `Jobs`, received on fixed days, and one evaluated phantom QA session."""
    done = _received(joblog, 1, "MG1", "SN42")
    _process(joblog, done, GOOD_QC)
    delivery = joblog.claim_delivery("sender", 60)
    assert delivery is not None
    joblog.delivery_sent(delivery.id, status=0, send_s=0.8)
    held = _received(joblog, 2, "MG2", "SN77", profile="hold")
    _process(joblog, held, {**GOOD_QC, "noise_after": 1.6}, [FLAG], hold=True)
    failed = _received(joblog, 3, "MG1", "SN99")
    job = joblog.claim_job("w1", 60)
    assert job is not None and job.id == failed
    joblog.job_failed(failed, "w1", "no noise parameters for detector SN99", retry_at=None)
    forwarding = _received(joblog, 4, "MG1", "SN42")
    _process(joblog, forwarding, {**GOOD_QC, "snr_after": float("nan")})
    queued = _received(joblog, 5, "MG2", "SN77")
    days = {done: (2026, 11, 20), held: (2026, 11, 25), failed: (2026, 11, 25), queued: (2026, 11, 28)}
    days[forwarding] = (2026, 11, 28)
    with joblog.engine.begin() as connection:  # fixed days, so the date filters have something to tell apart
        for job_id, day in days.items():
            at = datetime(*day, 9, 30, tzinfo=UTC)
            connection.execute(update(Job).where(Job.id == job_id).values(received_at=at))
    with joblog.engine.begin() as connection:
        connection.execute(
            QaSession.__table__.insert(),
            [
                {
                    "rule": "weekly-phantom",
                    "detector_serial": "SN42",
                    "station_name": "MG1",
                    "first_image_at": datetime(2026, 11, 21 + week * 3, 8, 0, tzinfo=UTC),
                    "last_image_at": datetime(2026, 11, 21 + week * 3, 8, 20, tzinfo=UTC),
                    "status": QaSessionStatus.evaluated.value,
                    "attempts": 1,
                    "evaluated_at": datetime(2026, 11, 21 + week * 3, 9, 0, tzinfo=UTC),
                    "result": {  # as dicom_node.qa.phantom stores it (the figures the trends read)
                        "full_dose": {"rn": 1.0, "snr": 30.0},
                        "doses": [
                            {
                                "dose_fraction": 0.5,
                                "restored": {"rn": 1.1 + week * 0.1, "b2": 0.02, "mnse": 1.12 + week * 0.1},
                                "rescaled": {"rn": 2.0, "b2": 0.0, "mnse": 2.0, "snr": 21.0},
                            },
                            {
                                "dose_fraction": 0.25,
                                "restored": None,
                                "rescaled": {"rn": 4.0, "b2": None},
                                "error": "x",
                            },
                        ],
                    },
                }
                for week in range(2)
            ],
        )
    _views(data_dir, done, 1)
    _views(data_dir, held, 2)
    return Jobs(done=done, held=held, failed=failed, queued=queued, forwarding=forwarding)
