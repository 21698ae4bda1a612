"""The job log: schema migrations, queue semantics, leases and concurrent claims on SQLite."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.exc import StatementError

from dicom_node.errors import InputRefused
from dicom_node.joblog import Change, DeliverySnapshot, DeliveryStatus, JobLog, JobSnapshot, JobStatus
from dicom_node.joblog.tables import Base, Delivery, Job


def job_fields(n: int) -> dict:
    return dict(
        sop_instance_uid=f"1.2.826.0.1.3680043.8.498.{n}",
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2.1",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        calling_ae="MAMMO",
        called_ae="NODE",
        peer_host="127.0.0.1",
        station_name="MG1",
        detector_serial="SN42",
        profile="default",
        input_path=f"/spool/{n}.dcm",
        input_sha256=f"{n:064x}",
        input_bytes=1000 + n,
    )


def url_of(path: Path) -> str:
    return f"sqlite:///{path}"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "joblog.sqlite"


@pytest.fixture
def log(db_path: Path) -> Iterator[JobLog]:
    joblog = JobLog(url_of(db_path))
    yield joblog
    joblog.close()


def claimed(log: JobLog, n: int = 1, worker: str = "w1", lease_s: float = 30) -> JobSnapshot:
    """Receive one job and claim it."""
    job_id = log.record_received(**job_fields(n))
    job = log.claim_job(worker, lease_s)
    assert job is not None and job.id == job_id
    return job


def processed(log: JobLog, job_id: int, worker: str, deliveries: list[tuple[str, str]]) -> bool:
    return log.job_processed(
        job_id,
        worker,
        derived_path=f"/derived/{job_id}.dcm",
        derived_sop_instance_uid=f"2.25.{job_id}",
        qc={"snr_gain": 2.0},
        timings={"restore": 1.5},
        device="cpu",
        model_digest=None,
        deliveries=deliveries,
    )


# --- schema ------------------------------------------------------------------------------------


def _alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", "dicom_node.joblog:migrations")
    return config


def test_migration_on_empty_file_matches_models_and_sets_pragmas(log, db_path):
    assert db_path.is_file()  # its folder was created too
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    with log.engine.connect() as connection:
        assert MigrationContext.configure(connection).get_current_revision() == head
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        pragmas = {
            name: connection.exec_driver_sql(f"PRAGMA {name}").scalar()
            for name in ("journal_mode", "busy_timeout", "foreign_keys")
        }
    print("schema diff:", diff, "pragmas:", pragmas)
    assert diff == []
    assert pragmas["journal_mode"] == "wal"
    assert pragmas["busy_timeout"] >= 5000
    assert pragmas["foreign_keys"] == 1
    assert {"jobs", "deliveries", "alembic_version"} <= set(inspect(log.engine).get_table_names())


def test_reopening_an_existing_file_keeps_data_and_schema(log, db_path):
    job_id = log.record_received(**job_fields(1))
    log.close()
    reopened = JobLog(url_of(db_path))
    with reopened.engine.connect() as connection:
        versions = connection.execute(text("SELECT version_num FROM alembic_version")).all()
    assert len(versions) == 1
    assert reopened.get_job(job_id).sop_instance_uid == job_fields(1)["sop_instance_uid"]
    reopened.close()


def test_concurrent_first_opens_migrate_once(tmp_path):
    """The receiver and the workers start together on a fresh file: none may fail."""
    url = url_of(tmp_path / "fresh" / "joblog.sqlite")
    with ThreadPoolExecutor(6) as pool:
        for opened in [pool.submit(JobLog, url) for _ in range(6)]:
            opened.result().close()  # re-raises a failed open
    joblog = JobLog(url)
    with joblog.engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
    joblog.close()


def test_snapshots_carry_every_column():
    assert {f.name for f in fields(JobSnapshot)} == set(Job.__table__.columns.keys())
    assert {f.name for f in fields(DeliverySnapshot)} == set(Delivery.__table__.columns.keys())


# --- jobs ----------------------------------------------------------------------------------------


def test_received_job_has_aware_utc_times_and_naive_times_are_refused(log):
    before = datetime.now(UTC)
    job = log.get_job(log.record_received(**job_fields(1)))
    assert job.status == JobStatus.received and job.attempts == 0
    assert job.received_at.tzinfo == UTC and before <= job.received_at <= datetime.now(UTC)
    claim = log.claim_job("w1", 30)
    with pytest.raises(StatementError, match="naive"):
        log.job_failed(claim.id, "w1", "boom", retry_at=datetime(2030, 1, 1))
    assert log.get_job(claim.id).status == JobStatus.processing  # nothing half-written


def test_claim_takes_oldest_first_and_each_job_once(log):
    ids = [log.record_received(**job_fields(n)) for n in range(3)]
    claims = [log.claim_job("w1", 30) for _ in range(4)]
    assert [c.id for c in claims[:3]] == ids
    assert claims[3] is None
    first = claims[0]
    assert first.status == JobStatus.processing and first.attempts == 1 and first.lease_owner == "w1"
    assert first.lease_expires_at - first.claimed_at == timedelta(seconds=30)
    assert log.get_job(first.id).lease_expires_at == first.lease_expires_at


def test_heartbeat_renews_only_the_owners_lease(log):
    job = claimed(log, lease_s=10)
    assert log.heartbeat(job.id, "w1", 100)
    renewed = log.get_job(job.id).lease_expires_at
    assert renewed - job.lease_expires_at > timedelta(seconds=80)
    assert not log.heartbeat(job.id, "w2", 100)
    assert log.get_job(job.id).lease_expires_at == renewed


def test_expired_lease_is_taken_by_another_worker(log):
    old = claimed(log, lease_s=5)
    assert log.claim_job("w2", 5) is None  # still leased
    later = datetime.now(UTC) + timedelta(seconds=6)
    new = log.claim_job("w2", 60, now=later)
    assert new.id == old.id and new.lease_owner == "w2" and new.attempts == 2
    assert not log.heartbeat(old.id, "w1", 60)
    assert not processed(log, old.id, "w1", [("pacs", "derived")])  # the late result is dropped
    assert log.deliveries(old.id) == []
    assert log.heartbeat(new.id, "w2", 60)
    assert processed(log, new.id, "w2", [("pacs", "derived")])


def test_reclaim_expired_resets_jobs_and_deliveries(log):
    first, second = (log.record_received(**job_fields(n)) for n in range(2))
    log.claim_job("w1", 5)
    processed(log, log.claim_job("w1", 5).id, "w1", [("pacs", "derived")])
    sending = log.claim_delivery("f1", 5)
    assert log.reclaim_expired() == 0
    later = datetime.now(UTC) + timedelta(seconds=6)
    assert log.reclaim_expired(now=later) == 2
    job = log.get_job(first)
    assert job.status == JobStatus.received and job.lease_owner is None
    assert not log.heartbeat(first, "w1", 60)
    delivery = log.deliveries(second)[0]
    assert delivery.id == sending.id and delivery.status == DeliveryStatus.pending
    assert log.claim_delivery("f2", 5, now=later).id == sending.id


def test_the_restoration_plan_is_recorded_by_the_lease_holder_and_the_result_names_the_model(log):
    job = claimed(log)
    assert (job.pipeline, job.restorer_options, job.dose_fraction) == (None, None, None)  # not decided at receipt
    assert not log.record_plan(job.id, "w2", pipeline="deep", restorer_options={}, dose_fraction=0.5)
    assert log.record_plan(job.id, "w1", pipeline="deep", restorer_options={"model": ""}, dose_fraction=0.5)
    planned = log.get_job(job.id)
    assert (planned.pipeline, planned.restorer_options, planned.dose_fraction, planned.model_name) == (
        "deep",
        {"model": ""},
        0.5,
        None,
    )
    log.job_processed(
        job.id,
        "w1",
        derived_path="/d.dcm",
        derived_sop_instance_uid="2.25.9",
        qc={},
        timings={},
        device="cpu",
        model_digest="ab" * 32,
        deliveries=[],
        model_name="hresnet-phantom-50",
    )
    done = log.get_job(job.id)
    assert (done.model_name, done.model_digest, done.device) == ("hresnet-phantom-50", "ab" * 32, "cpu")


def test_stages_are_stamped_with_times_and_durations(log):
    job = claimed(log)
    for stage, duration in (("decoded", 0.25), ("restored", 3.5), ("derived", 0.5)):
        log.record_stage(job.id, stage, duration)
    with pytest.raises(ValueError, match="stage"):
        log.record_stage(job.id, "painted", 1.0)
    stamped = log.get_job(job.id)
    print("stages:", stamped.decoded_at, stamped.restored_at, stamped.derived_at)
    assert (stamped.decode_s, stamped.restore_s, stamped.derive_s) == (0.25, 3.5, 0.5)
    assert job.claimed_at <= stamped.decoded_at <= stamped.restored_at <= stamped.derived_at
    processed(log, job.id, "w1", [])
    done = log.get_job(job.id)
    assert done.status == JobStatus.done and done.completed_at >= stamped.derived_at  # nothing to send
    assert done.timings == {"restore": 1.5} and done.qc == {"snr_gain": 2.0} and done.device == "cpu"


def test_failed_job_waits_for_retry_at_or_fails_for_good(log):
    first, second = (log.record_received(**job_fields(n)) for n in range(2))
    log.claim_job("w1", 30)
    retry_at = datetime.now(UTC) + timedelta(minutes=5)
    assert log.job_failed(first, "w1", "decoder crashed", retry_at=retry_at)
    job = log.get_job(first)
    assert job.status == JobStatus.received and job.next_attempt_at == retry_at and job.lease_owner is None
    assert log.claim_job("w1", 30).id == second  # the failed one is not due yet
    assert log.claim_job("w1", 30) is None
    assert processed(log, second, "w1", [])
    again = log.claim_job("w2", 30, now=retry_at + timedelta(seconds=1))
    assert again.id == first and again.attempts == 2
    assert log.job_failed(first, "w2", "unsupported photometric", retry_at=None)
    failed = log.get_job(first)
    assert failed.status == JobStatus.failed and failed.last_error == "unsupported photometric"
    assert log.claim_job("w3", 30, now=retry_at + timedelta(days=1)) is None


# --- deliveries ---------------------------------------------------------------------------------


def test_deliveries_lifecycle_until_done(log):
    job_id = claimed(log).id
    assert processed(log, job_id, "w1", [("pacs", "derived"), ("archive", "original")])
    assert log.get_job(job_id).status == JobStatus.forwarding
    first, second = log.claim_delivery("f1", 30), log.claim_delivery("f2", 30)
    assert {first.destination, second.destination} == {"pacs", "archive"}
    assert first.status == DeliveryStatus.sending and first.attempts == 1
    assert log.claim_delivery("f3", 30) is None

    retry_at = datetime.now(UTC) + timedelta(seconds=60)
    log.delivery_failed(first.id, error="connection refused", status=None, retry_at=retry_at)
    log.delivery_sent(second.id, status=0x0000, send_s=0.8)
    assert log.get_job(job_id).status == JobStatus.forwarding
    assert log.claim_delivery("f1", 30) is None  # not due yet
    again = log.claim_delivery("f1", 30, now=retry_at)
    assert again.id == first.id and again.attempts == 2 and again.last_error == "connection refused"
    log.delivery_sent(again.id, status=0x0000, send_s=1.2)

    job = log.get_job(job_id)
    assert job.status == JobStatus.done and job.completed_at is not None
    sent = log.deliveries(job_id)
    assert [d.status for d in sent] == [DeliveryStatus.sent] * 2
    assert all(d.sent_at <= job.completed_at and d.last_status == 0 for d in sent)


def test_permanent_delivery_failure_fails_the_job_and_retry_resends_it(log):
    job_id = claimed(log).id
    processed(log, job_id, "w1", [("pacs", "derived")])
    delivery = log.claim_delivery("f1", 30)
    log.delivery_failed(delivery.id, error="SOP class refused", status=0x0122, retry_at=None)
    job = log.get_job(job_id)
    assert job.status == JobStatus.failed and "SOP class refused" in job.last_error
    assert log.deliveries(job_id)[0].status == DeliveryStatus.failed

    assert log.retry(job_id)
    assert log.get_job(job_id).status == JobStatus.forwarding
    resent = log.claim_delivery("f1", 30)
    assert resent.id == delivery.id and resent.attempts == 1  # backoff starts afresh
    log.delivery_sent(resent.id, status=0, send_s=0.1)
    assert log.get_job(job_id).status == JobStatus.done


# --- IT commands ----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["retry", "cancel"])
def test_retry_and_cancel_of_an_unknown_job_are_refused(log, command):
    with pytest.raises(InputRefused, match="no job"):
        getattr(log, command)(999)


def test_retry_and_cancel_of_jobs(log):
    queued = log.record_received(**job_fields(1))
    assert not log.retry(queued)  # already queued
    assert log.cancel(queued) and not log.cancel(queued)
    assert log.get_job(queued).status == JobStatus.cancelled
    assert log.claim_job("w1", 30) is None
    assert log.retry(queued) and log.get_job(queued).status == JobStatus.received
    claimed = log.claim_job("w1", 30)

    assert log.retry(claimed.id) == Change(False, f"job {claimed.id} is processing: nothing to retry")
    assert log.cancel(claimed.id)  # the worker loses its lease
    assert not log.heartbeat(claimed.id, "w1", 30)
    assert not processed(log, claimed.id, "w1", [("pacs", "derived")])

    log.retry(claimed.id)
    processed(log, log.claim_job("w1", 30).id, "w1", [("pacs", "derived"), ("folder", "derived")])
    log.delivery_sent(log.claim_delivery("f1", 30).id, status=0, send_s=0.1)
    assert log.cancel(claimed.id)
    statuses = sorted(d.status for d in log.deliveries(claimed.id))
    assert statuses == [DeliveryStatus.cancelled, DeliveryStatus.sent]
    assert log.claim_delivery("f1", 30) is None
    assert log.retry(claimed.id)  # only the cancelled delivery goes again
    log.delivery_sent(log.claim_delivery("f1", 30).id, status=0, send_s=0.1)
    assert log.get_job(claimed.id).status == JobStatus.done
    assert not log.retry(claimed.id) and "done" in log.retry(claimed.id).message
    assert log.cancel(claimed.id) == Change(False, f"job {claimed.id} is done already: nothing to cancel")


def test_a_send_in_flight_when_cancelled_is_not_retried_until_the_job_is(log):
    processed(log, claimed(log).id, "w1", [("pacs", "derived")])
    sending = log.claim_delivery("f1", 30)
    assert log.cancel(sending.job_id)
    log.delivery_failed(sending.id, error="association aborted", status=None, retry_at=datetime.now(UTC))
    assert log.claim_delivery("f1", 30, now=datetime.now(UTC) + timedelta(hours=1)) is None
    assert log.retry(sending.job_id)
    assert log.claim_delivery("f1", 30).id == sending.id


def test_list_jobs_filters_and_find_by_sop_instance(log):
    ids = [log.record_received(**job_fields(n)) for n in range(5)]
    log.record_received(**job_fields(2))  # a duplicate instance
    midpoint = log.get_job(ids[3]).received_at
    log.job_failed(log.claim_job("w1", 30).id, "w1", "boom", retry_at=None)

    assert [j.id for j in log.list_jobs()] == sorted(ids + [ids[-1] + 1], reverse=True)
    assert [j.id for j in log.list_jobs(status=JobStatus.failed)] == [ids[0]]
    assert [j.id for j in log.list_jobs(status="received", limit=2)] == [ids[-1] + 1, ids[4]]
    assert [j.id for j in log.list_jobs(since=midpoint)] == [ids[-1] + 1, ids[4], ids[3]]
    assert log.list_jobs(status="done") == []
    duplicates = log.find_by_sop_instance(job_fields(2)["sop_instance_uid"])
    assert [j.id for j in duplicates] == [ids[2], ids[-1] + 1]
    assert log.get_job(12345) is None


def test_a_job_whose_worker_keeps_dying_fails_at_the_cap_with_the_reason(db_path):
    """A lease that runs out on the last attempt fails the job: the image is not claimed forever."""
    log = JobLog(url_of(db_path), max_attempts=2)
    job_id = log.record_received(**job_fields(1))
    now = datetime.now(UTC)
    for attempt in (1, 2):
        job = log.claim_job(f"w{attempt}", 5, now=now)
        assert job.id == job_id and job.attempts == attempt
        now += timedelta(seconds=10)  # the worker died: no heartbeat
    assert log.claim_job("w3", 5, now=now) is None
    failed = log.get_job(job_id)
    assert failed.status == JobStatus.failed
    assert failed.last_error == "worker w2 stopped renewing its lease on 2 attempts"
    kinds = [event.kind for event in log.events(job_id)]
    assert kinds == ["received", "claimed", "handed-back", "claimed", "failed"]


def test_hand_back_counts_a_dead_workers_attempt_but_not_a_stop(db_path):
    log = JobLog(url_of(db_path), max_attempts=2)
    first = log.record_received(**job_fields(1))
    second = log.record_received(**job_fields(2))
    log.claim_job("node-a/host:1", 30)
    assert log.hand_back("node-a/host:1", "worker killed by signal 11") == [first]
    assert log.get_job(first).status == JobStatus.received and log.get_job(first).attempts == 1
    log.claim_job("node-a/host:2", 30)  # the second attempt, by the restarted worker
    log.claim_job("node-a/host:3", 30)
    assert sorted(log.hand_back("node-a/", "node restarted", counts=False, prefix=True)) == [first, second]
    assert [log.get_job(j).attempts for j in (first, second)] == [1, 0]  # a stop is not the job's fault
    log.claim_job("node-a/host:4", 30)
    assert log.hand_back("node-a/host:4", "worker killed by signal 11") == [first]
    assert log.get_job(first).last_error == "worker killed by signal 11 on 2 attempts"
    assert log.get_job(first).status == JobStatus.failed
    assert log.hand_back("node-b/", "nothing held", prefix=True) == []


def test_retry_makes_a_waiting_job_or_send_due_now(log):
    job = claimed(log)
    later = datetime.now(UTC) + timedelta(hours=1)
    log.job_failed(job.id, "w1", "GPU busy", retry_at=later)
    assert log.claim_job("w1", 30) is None
    change = log.retry(job.id)
    assert change and "processing is due now" in change.message
    assert log.claim_job("w1", 30).id == job.id
    assert not log.retry(job.id)  # processing: nothing to do

    processed(log, job.id, "w1", [("pacs", "derived")])
    send = log.claim_delivery("f1", 30)
    log.delivery_failed(send.id, error="connection refused", status=None, retry_at=later)
    assert log.claim_delivery("f1", 30) is None
    change = log.retry(job.id)
    assert change.message == f"job {job.id}: sends due now: derived to pacs"
    assert log.claim_delivery("f1", 30).id == send.id
    assert not log.retry(job.id)  # the send is in flight, none waits
    history = [(e.kind, e.destination, e.actor) for e in log.events(job.id)]
    assert ("send-failed", "pacs", None) in history and history.count(("retry", None, "cli")) == 2


def test_resend_and_reprocess_a_done_job(log):
    job = claimed(log)
    with pytest.raises(InputRefused, match="no derived image"):
        log.resend(job.id)
    processed(log, job.id, "w1", [("pacs", "derived"), ("archive", "derived")])
    for _ in range(2):
        log.delivery_sent(log.claim_delivery("f1", 30).id, status=0, send_s=0.1)
    assert log.get_job(job.id).status == JobStatus.done

    assert log.resend(job.id, ["pacs"]).message == f"job {job.id}: derived image queued to pacs"
    assert log.get_job(job.id).status == JobStatus.forwarding
    again = log.claim_delivery("f1", 30)
    assert (again.destination, again.attempts) == ("pacs", 1)
    log.delivery_sent(again.id, status=0, send_s=0.1)
    assert log.get_job(job.id).status == JobStatus.done
    assert "pacs, archive" in log.resend(job.id).message  # every destination it went to

    change = log.reprocess(job.id)
    assert change and "was forwarding" in change.message
    requeued = log.get_job(job.id)
    assert requeued.status == JobStatus.received and requeued.attempts == 0
    assert [d.status for d in log.deliveries(job.id)].count(DeliveryStatus.cancelled) == 2  # the unsent resends
    assert log.claim_job("w2", 30).id == job.id
    with pytest.raises(InputRefused, match="processing"):
        log.reprocess(job.id)


def test_a_passed_through_image_is_forwarding_at_once_and_never_claimed(log):
    job_id = log.record_received(**job_fields(1), pass_through_to=["pacs", "archive"])
    assert log.get_job(job_id).status == JobStatus.forwarding and log.claim_job("w1", 30) is None
    sends = log.deliveries(job_id)
    assert [(d.destination, d.kind, d.status) for d in sends] == [
        ("pacs", "original", DeliveryStatus.pending),
        ("archive", "original", DeliveryStatus.pending),
    ]
    for _ in sends:
        log.delivery_sent(log.claim_delivery("f1", 30).id, status=0, send_s=0.1)
    assert log.get_job(job_id).status == JobStatus.done


# --- concurrency ----------------------------------------------------------------------------------


def claim_all(url: str, worker: str, ready, go) -> list[tuple[int, str, int]]:
    """Open the log, wait for the start signal, claim until the queue is empty.

    Returns (job id, worker, pid) of every claim.
    """
    joblog = JobLog(url)
    ready.release()
    if not go.wait(timeout=60):
        raise TimeoutError("no start signal")
    claims = []
    while (job := joblog.claim_job(worker, 300)) is not None:
        claims.append((job.id, worker, os.getpid()))
    joblog.close()
    return claims


def _process_main(url: str, worker: str, ready, go, results) -> None:
    results.put(claim_all(url, worker, ready, go))


def test_threads_and_processes_claim_every_job_exactly_once(log, db_path):
    url = url_of(db_path)
    n_jobs, n_processes, n_threads = 300, 3, 3
    ids = {log.record_received(**job_fields(n)) for n in range(n_jobs)}

    context = multiprocessing.get_context("spawn")
    ready, go, results = context.Semaphore(0), context.Event(), context.Queue()
    processes = [
        context.Process(target=_process_main, args=(url, f"proc{i}", ready, go, results)) for i in range(n_processes)
    ]
    for process in processes:
        process.start()
    with ThreadPoolExecutor(n_threads) as pool:
        futures = [pool.submit(claim_all, url, f"thread{i}", ready, go) for i in range(n_threads)]
        for _ in range(n_processes + n_threads):
            assert ready.acquire(timeout=60), "a claimer did not start"
        started = time.perf_counter()
        go.set()
        claims = [claim for _ in processes for claim in results.get(timeout=120)]
        claims += [claim for future in futures for claim in future.result()]
    elapsed = time.perf_counter() - started
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0

    per_claimer = Counter(worker for _, worker, _ in claims)
    print(f"{len(claims)} claims in {elapsed:.2f} s: {dict(sorted(per_claimer.items()))}")
    assert sorted(job_id for job_id, _, _ in claims) == sorted(ids)  # every job, none twice
    assert len({pid for _, _, pid in claims}) >= 2  # claims really came from several processes
    owners = {job_id: worker for job_id, worker, _ in claims}
    for job in log.list_jobs(limit=n_jobs):
        assert job.status == JobStatus.processing and job.attempts == 1
        assert job.lease_owner == owners[job.id]
