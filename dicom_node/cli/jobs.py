"""The job log, for radiology IT: list jobs, show one with its history, retry, cancel, resend,
release or reprocess one. Each command says what it changed and exits 1 when it changed nothing; they call
the same `JobLog` functions a web page will."""

from __future__ import annotations

import getpass
import os
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from dicom_node.cli.common import ConfigOption, print_json
from dicom_node.config import load_config
from dicom_node.errors import InputRefused

if TYPE_CHECKING:
    from dicom_node.joblog import Change, DeliverySnapshot, JobLog

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
    ctx: typer.Context,
    status: Annotated[Optional[str], typer.Option(help="Only jobs in this state.")] = None,
    since: Annotated[Optional[str], typer.Option(help="Only jobs received since: 30m, 12h, 2d or an ISO date.")] = None,
    station: Annotated[Optional[str], typer.Option(help="Only jobs of this station name or calling AE.")] = None,
    detector: Annotated[Optional[str], typer.Option(help="Only jobs of this detector serial.")] = None,
    profile: Annotated[Optional[str], typer.Option(help="Only jobs of this profile.")] = None,
    flagged: Annotated[
        Optional[bool], typer.Option("--flagged/--not-flagged", help="Only jobs with (without) a QC flag.")
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 50,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON array: every field, with each job's sends.")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """List jobs from the job log: state, attempts, stage times, each send's state, the last error.
    `jobs show JOB` prints one job with its whole history."""
    from dicom_node.joblog import JobStatus

    if ctx.invoked_subcommand is not None:
        return
    if status is not None and status not in {s.value for s in JobStatus}:
        raise typer.BadParameter(
            f"must be one of {', '.join(s.value for s in JobStatus)}, got {status!r}", param_hint="--status"
        )
    joblog = open_joblog(config, quiet=as_json)
    found = joblog.list_jobs(
        status=status,
        since=parse_since(since),
        station=station,
        detector=detector,
        profile=profile,
        flagged=flagged,
        limit=limit,
    )
    if as_json:
        print_json([{**asdict(job), "deliveries": [asdict(d) for d in joblog.deliveries(job.id)]} for job in found])
        return
    if not found:
        typer.echo("no jobs", err=True)
        return
    typer.echo(
        f"{'JOB':>6}  {'RECEIVED (UTC)':<19}  {'STATUS':<10} {'TRIES':>5}  {'FROM':<16} {'PROFILE':<12} "
        f"{'RESTORE':>8}  SENDS / LAST ERROR"
    )
    for job in found:
        received = job.received_at.strftime("%Y-%m-%d %H:%M:%S")
        restore = f"{job.restore_s:.1f} s" if job.restore_s is not None else "-"
        sends = "; ".join(describe_delivery(d) for d in joblog.deliveries(job.id))
        error = f"  {job.last_error}" if job.last_error and job.status != "done" else ""
        if job.qc_flags:
            error += f"  QC: {'; '.join(str(flag['message']) for flag in job.qc_flags)}"
        typer.echo(
            f"{job.id:>6}  {received:<19}  {str(job.status):<10} {job.attempts:>5}  {job.calling_ae or '-':<16} "
            f"{job.profile or '-':<12} {restore:>8}  {sends or '-'}{error}"
        )


def show(
    job_id: JobArgument,
    as_json: Annotated[bool, typer.Option("--json", help="As one JSON object.")] = False,
    config: ConfigOption = None,
) -> None:
    """One job with its sends and its whole history."""
    joblog = open_joblog(config, quiet=as_json)
    job = joblog.get_job(job_id)
    if job is None:
        raise InputRefused(f"no job {job_id}")
    deliveries, events = joblog.deliveries(job_id), joblog.events(job_id)
    if as_json:
        print_json(
            {**asdict(job), "deliveries": [asdict(d) for d in deliveries], "events": [asdict(e) for e in events]}
        )
        return
    stages = ", ".join(
        f"{name} {value:.2f} s"
        for name, value in (("decode", job.decode_s), ("restore", job.restore_s), ("derive", job.derive_s))
        if value is not None
    )
    lines = [
        f"job {job.id}: {job.status} after {job.attempts} attempt(s)"
        + (f"; last error: {job.last_error}" if job.last_error else ""),
        f"  image      {job.sop_instance_uid} from {job.calling_ae} ({job.peer_host or '-'}), detector {job.detector_serial or '-'}",
        f"  profile    {job.profile}: {job.pipeline or '(not planned yet)'}, dose fraction {job.dose_fraction if job.dose_fraction is not None else '-'}"
        + (f", model {job.model_name}" if job.model_name else ""),
        f"  stages     {stages or '-'}",
        f"  derived    {job.derived_sop_instance_uid or '-'}",
        *(f"  QC flag    {flag['message']}" for flag in job.qc_flags or []),
        "  sends:" if deliveries else "  sends: none",
        *(f"    {describe_delivery(d)}" for d in deliveries),
        "  history:",
        *(
            f"    {e.at.strftime('%Y-%m-%d %H:%M:%S')}  {e.kind:<14} {e.destination or '':<10} {e.detail or ''}"
            + (f"  [{e.actor}]" if e.actor else "")
            for e in events
        ),
    ]
    typer.echo("\n".join(lines))


def describe_delivery(delivery: DeliverySnapshot) -> str:
    """ "pacs derived: sent" or "pacs derived: pending, 2 attempts, next 12:03:10, last: connection refused"."""
    text = f"{delivery.destination} {delivery.kind}: {delivery.status}"
    if delivery.status != "sent" and delivery.attempts:
        text += f", {delivery.attempts} attempt{'s' if delivery.attempts != 1 else ''}"
    if delivery.status == "pending" and delivery.next_attempt_at is not None:
        text += f", next {delivery.next_attempt_at.strftime('%Y-%m-%d %H:%M:%S')}"
    if delivery.last_error and delivery.status != "sent":
        text += f", last: {delivery.last_error}"
    return text


def open_joblog(config_path: Path | None, *, quiet: bool = False) -> JobLog:
    """The configuration's job log, named on stderr (unless `quiet`) so nobody reads the wrong one."""
    from dicom_node.checks import existing_joblog_url
    from dicom_node.joblog import JobLog

    cfg = load_config(config_path)
    url = existing_joblog_url(cfg)  # a job log that is not there is refused, never created empty
    if not quiet:
        typer.echo(f"job log: {describe_database(url)}", err=True)
    return JobLog(url, cfg.worker.max_attempts, cfg.database.busy_timeout_s)


def describe_database(url: str) -> str:
    """The database URL with any password hidden (a SQLite file: its path)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        return parsed.database
    return parsed.render_as_string(hide_password=True)


def _actor() -> str:
    """Who runs the command, for the job's history and the audit trail: "cli alice"."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (e.g. a container's)
        user = f"uid {os.getuid()}"
    return f"cli {user}"


def _said(change: Change) -> int:
    """Print what a command changed (stdout, exit 0) or why it changed nothing (stderr, exit 1)."""
    typer.echo(change.message, err=not change.changed)
    return 0 if change.changed else 1


def retry(job_id: JobArgument, config: ConfigOption = None) -> int:
    """Do a job's next step now: queue a failed or cancelled job again, or make a waiting retry (of
    its processing or its sends) due now. Exit 1 when there was nothing to do."""
    return _said(open_joblog(config, quiet=True).retry(job_id, actor=_actor()))


def cancel(job_id: JobArgument, config: ConfigOption = None) -> int:
    """Stop a job: it will not be processed or sent any further. Exit 1 when it was finished already."""
    return _said(open_joblog(config, quiet=True).cancel(job_id, actor=_actor()))


def resend(
    job_id: JobArgument,
    to: Annotated[
        Optional[list[str]],
        typer.Option("--to", help="A destination name (repeatable); default: where it went before."),
    ] = None,
    config: ConfigOption = None,
) -> int:
    """Send a job's derived image again (PACS lost it): same UIDs, so it replaces, never duplicates."""
    cfg = load_config(config)
    known = {destination.name for destination in cfg.destinations}
    unknown = [name for name in to or [] if name not in known]
    if unknown:
        raise typer.BadParameter(
            f"no destination {', '.join(map(repr, unknown))}; configured: {', '.join(sorted(known))}", param_hint="--to"
        )
    return _said(open_joblog(config, quiet=True).resend(job_id, to, actor=_actor()))


def release(job_id: JobArgument, config: ConfigOption = None) -> int:
    """Send a job held for QC review (its profile holds flagged images) after all. Exit 1 when it is not held."""
    return _said(open_joblog(config, quiet=True).release(job_id, actor=_actor()))


def reprocess(job_id: JobArgument, config: ConfigOption = None) -> int:
    """Restore a job again from its spooled input (a new model, a corrected calibration), then send it."""
    return _said(open_joblog(config, quiet=True).reprocess(job_id, actor=_actor()))
