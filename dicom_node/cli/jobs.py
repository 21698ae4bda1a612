"""The job log, for radiology IT: list jobs, retry or cancel one."""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Annotated, Optional

import typer

from dicom_node.cli.common import ConfigOption, print_json
from dicom_node.config import load_config

JobArgument = Annotated[int, typer.Argument(metavar="JOB", help="Job number (see `jobs`).")]


def parse_since(since: str | None) -> datetime | None:
    """30m, 12h, 2d (ago) or an ISO date (UTC unless it names a zone)."""
    if since is None:
        return None
    units = {"m": "minutes", "h": "hours", "d": "days"}
    if since[-1:] in units and since[:-1].replace(".", "", 1).isdigit():
        return datetime.now(UTC) - timedelta(**{units[since[-1]]: float(since[:-1])})
    try:
        moment = datetime.fromisoformat(since)
    except ValueError:
        raise typer.BadParameter(
            f"must be like 30m, 12h, 2d or an ISO date, got {since!r}", param_hint="--since"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def jobs(
    status: Annotated[Optional[str], typer.Option(help="Only jobs in this state.")] = None,
    since: Annotated[Optional[str], typer.Option(help="Only jobs received since: 30m, 12h, 2d or an ISO date.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array with every field.")] = False,
    config: ConfigOption = None,
) -> None:
    """List jobs from the job log."""
    from dicom_node.joblog import JobLog, JobStatus

    cfg = load_config(config)
    if status is not None and status not in {s.value for s in JobStatus}:
        raise typer.BadParameter(
            f"must be one of {', '.join(s.value for s in JobStatus)}, got {status!r}", param_hint="--status"
        )
    found = JobLog(cfg.database_url).list_jobs(status=status, since=parse_since(since), limit=limit)
    if as_json:
        print_json([asdict(job) for job in found])
        return
    for job in found:
        received = job.received_at.strftime("%Y-%m-%d %H:%M:%S") if job.received_at else "-"
        error = f"  {job.last_error}" if job.last_error and job.status != "done" else ""
        typer.echo(
            f"{job.id:>6}  {received}  {str(job.status):<10} {job.calling_ae or '-':<16} "
            f"{job.profile or '-':<12} {job.sop_instance_uid}{error}"
        )
    if not found:
        typer.echo("no jobs", err=True)


def retry(job_id: JobArgument, config: ConfigOption = None) -> None:
    """Queue a failed or cancelled job (or its failed sends) again."""
    from dicom_node.joblog import JobLog

    JobLog(load_config(config).database_url).retry(job_id)
    typer.echo(f"job {job_id} queued again")


def cancel(job_id: JobArgument, config: ConfigOption = None) -> None:
    """Stop a job: it will not be processed or sent any further."""
    from dicom_node.joblog import JobLog

    JobLog(load_config(config).database_url).cancel(job_id)
    typer.echo(f"job {job_id} cancelled")
