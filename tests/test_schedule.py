"""Retention: finished jobs' files go after retention_days; unfinished jobs' inputs stay."""

import os
from datetime import UTC, datetime, timedelta

from dicom_node.config import parse_config
from dicom_node.joblog import JobLog
from dicom_node.node.schedule import remove_expired_files


def job(joblog: JobLog, path, uid: str) -> int:
    return joblog.record_received(
        sop_instance_uid=uid,
        study_instance_uid="1.2",
        series_instance_uid="1.2.3",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2.1",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        calling_ae="MAMMO1",
        called_ae="DOSENODE",
        peer_host="127.0.0.1",
        station_name=None,
        detector_serial=None,
        profile="p",
        input_path=str(path),
        input_sha256="00",
        input_bytes=1,
    )


def test_retention_keeps_unfinished_inputs_and_removes_old_finished_and_orphan_files(tmp_path):
    config = parse_config({"node": {"data_dir": str(tmp_path), "retention_days": 2}})
    joblog = JobLog(config.database_url)
    study = tmp_path / "spool" / "1.2"
    study.mkdir(parents=True)
    finished_in, waiting_in, orphan = study / "a.dcm", study / "b.dcm", study / "orphan.dcm"
    derived = tmp_path / "derived.dcm"
    for path in (finished_in, waiting_in, orphan, derived):
        path.write_bytes(b"x")
    day_old = datetime.now(UTC).timestamp() - 2 * 86400
    os.utime(orphan, (day_old, day_old))

    finished = job(joblog, finished_in, "1.1")
    claimed = joblog.claim_job("w", 60)
    assert claimed.id == finished
    joblog.job_processed(
        finished,
        "w",
        derived_path=str(derived),
        derived_sop_instance_uid="9.9",
        qc={},
        timings={},
        device="cpu",
        model_digest=None,
        deliveries=[],
    )
    job(joblog, waiting_in, "1.2")  # received, not yet restored nor sent

    assert remove_expired_files(config, joblog) == 1  # only the day-old orphan: the job finished just now
    assert not orphan.exists() and finished_in.exists() and derived.exists()
    later = datetime.now(UTC) + timedelta(days=3)
    assert remove_expired_files(config, joblog, now=later) == 2
    assert not finished_in.exists() and not derived.exists()
    assert waiting_in.exists()  # never removed before its job is done
