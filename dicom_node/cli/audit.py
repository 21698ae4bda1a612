"""The audit trail, for radiology IT and the security officer: who connected, what came in and
went out, who changed a job, which configuration ran."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Optional

import typer

from dicom_node.cli.common import ConfigOption, print_json
from dicom_node.cli.jobs import open_joblog, parse_since

OUTCOMES = {0: "ok", 4: "minor failure", 8: "serious failure", 12: "major failure"}


def audit(
    since: Annotated[Optional[str], typer.Option(help="Only lines since: 30m, 12h, 2d or an ISO date.")] = None,
    event: Annotated[
        Optional[str], typer.Option(help="Only this event, e.g. association-rejected, instance-sent, job-cancelled.")
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array of the lines.")] = False,
    config: ConfigOption = None,
) -> None:
    """List the audit trail from the job log, newest first (also sent to syslog when [audit.syslog] is set)."""
    from dicom_node.audit.atna import EVENTS

    if event is not None and event not in EVENTS:
        raise typer.BadParameter(f"must be one of {', '.join(EVENTS)}, got {event!r}", param_hint="--event")
    lines = open_joblog(config, quiet=as_json).audit_events(since=parse_since(since), event=event, limit=limit)
    if as_json:
        print_json([asdict(line) for line in lines])
        return
    if not lines:
        typer.echo("no audit lines", err=True)
        return
    typer.echo(f"{'AT (UTC)':<19}  {'EVENT':<21} {'OUTCOME':<15} {'WHO':<24} {'JOB':>6}  DETAIL")
    for line in lines:
        who = f"{line.actor}@{line.address}" if line.address else line.actor
        detail = ", ".join(f"{key} {value}" for key, value in line.detail.items())
        typer.echo(
            f"{line.at.strftime('%Y-%m-%d %H:%M:%S')}  {line.event:<21} {OUTCOMES.get(line.outcome, line.outcome)!s:<15} "
            f"{who:<24} {line.job_id or '-':>6}  {detail}"
        )
