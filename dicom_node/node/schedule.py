"""Every periodic duty of a running node, in one APScheduler instance.

- dispatch: send due deliveries (several at once, each claimed atomically from the job log);
- lease recovery: jobs and sends whose owner stopped renewing go back to the queue;
- audit: the audit trail's new lines go to the syslog collector, when one is configured;
- retention: spooled inputs and derived files of finished jobs are removed after retention_days
  (an input is never removed before every destination has acknowledged its output), and spool
  files that no job refers to (written, then the job row failed: never acknowledged) after a day.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler

from dicom_node.audit import SyslogShipper
from dicom_node.config import Config
from dicom_node.forward.dispatch import Dispatcher
from dicom_node.joblog import JobLog, JobStatus

log = logging.getLogger("dicom_node.node.schedule")

DISPATCH_EVERY_S = 1.0
CONCURRENT_SENDS = 4
LEASE_RECOVERY_EVERY_S = 30.0
RETENTION_EVERY_H = 1.0
ORPHAN_AGE_S = 24 * 3600.0  # long past any store still between its spool write and its job row


def remove_expired_files(config: Config, joblog: JobLog, now: datetime | None = None) -> int:
    """Delete the files of jobs that finished more than retention_days ago; returns files removed."""
    now = now or datetime.now(UTC)
    cutoff = now - timedelta(days=config.node.retention_days)
    removed = 0
    jobs = joblog.list_jobs(limit=None)
    for job in jobs:
        if job.status != JobStatus.done or job.completed_at is None or job.completed_at > cutoff:
            continue
        for name in (job.input_path, job.derived_path):
            if name and Path(name).exists():
                Path(name).unlink()
                removed += 1
    referenced = {Path(job.input_path) for job in jobs if job.input_path}
    spool = config.data_dir / "spool"
    if spool.is_dir():
        for path in spool.glob("*/*.dcm"):
            if path not in referenced and now.timestamp() - path.stat().st_mtime > ORPHAN_AGE_S:
                path.unlink()
                removed += 1
    if removed:
        log.info("retention: removed %d files of finished jobs", removed)
    return removed


def build_scheduler(config: Config, joblog: JobLog, dispatcher: Dispatcher) -> BackgroundScheduler:
    scheduler = BackgroundScheduler(timezone=UTC, job_defaults={"coalesce": True, "misfire_grace_time": 30})
    scheduler.add_job(
        dispatcher.dispatch_due, "interval", seconds=DISPATCH_EVERY_S, id="dispatch", max_instances=CONCURRENT_SENDS
    )
    scheduler.add_job(joblog.reclaim_expired, "interval", seconds=LEASE_RECOVERY_EVERY_S, id="lease-recovery")
    scheduler.add_job(remove_expired_files, "interval", hours=RETENTION_EVERY_H, args=(config, joblog), id="retention")
    audit = config.audit
    if audit.syslog is not None:
        shipper = SyslogShipper(
            audit.syslog,
            source_id=audit.source_id or config.node.ae_title,
            node_ae=config.node.ae_title,
            ca=config.resolve(audit.syslog.ca) if audit.syslog.ca else None,
        )
        scheduler.add_job(shipper.ship, "interval", seconds=audit.ship_every_s, args=(joblog,), id="audit-syslog")
    return scheduler
