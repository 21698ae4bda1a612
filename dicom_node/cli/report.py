"""`dicom-node report`: a period's job list and per-station summary, for QA staff and radiology IT."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from dicom_node.cli.common import ConfigOption
from dicom_node.cli.jobs import open_joblog, parse_since
from dicom_node.errors import InputRefused

if TYPE_CHECKING:
    from dicom_node.joblog import DeliverySnapshot, JobLog

_CHUNK = 500  # job ids per query: well under every database's limit of bound parameters


class ReportFormat(StrEnum):
    md = "md"
    csv = "csv"
    html = "html"


def report(
    since: Annotated[
        Optional[str], typer.Option(help="Jobs received since: 30m, 12h, 2d (ago) or an ISO date (UTC).")
    ] = None,
    until: Annotated[
        Optional[str], typer.Option(help="Jobs received before: 30m, 12h, 2d (ago) or an ISO date (UTC).")
    ] = None,
    station: Annotated[Optional[str], typer.Option(help="Only this station (Station Name or calling AE).")] = None,
    fmt: Annotated[
        ReportFormat,
        typer.Option("--format", help="md: summary and job list; csv: the job list; html: one self-contained page."),
    ] = ReportFormat.md,
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="Write to this file (atomically); default stdout.")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """The jobs of a period and, per station, their counts by state, median and p95 stage times and
    QC flags (docs/metrics.md)."""
    from dicom_node.files import write_atomically
    from dicom_node.joblog import JobFilter
    from dicom_node.qa.report import RENDERERS, build_report

    start, end = parse_since(since), _parse_until(until)
    joblog = open_joblog(config)
    try:
        jobs = joblog.list_jobs(JobFilter(since=start, until=end, station=station), limit=None)
        deliveries = deliveries_of(joblog, [job.id for job in jobs])
    finally:
        joblog.close()
    result = build_report(jobs, deliveries, generated_at=datetime.now(UTC), since=start, until=end, station=station)
    text = RENDERERS[fmt.value](result)
    if not jobs:
        typer.echo(f"no jobs received {result.period}" + (f" at station {station}" if station else ""), err=True)
    if output is None:
        sys.stdout.write(text)
    else:
        try:
            write_atomically(output, text.encode(), mode=0o644)
        except OSError as exc:
            raise InputRefused(f"cannot write the report to {output}: {exc.strerror or exc}") from None
        typer.echo(f"report written to {output}", err=True)


def _parse_until(until: str | None) -> datetime | None:
    """--until as --since reads it (a bad value is blamed on --until)."""
    try:
        return parse_since(until)
    except typer.BadParameter as exc:
        raise typer.BadParameter(exc.message, param_hint="--until") from None


def deliveries_of(joblog: JobLog, job_ids: Sequence[int]) -> dict[int, list[DeliverySnapshot]]:
    """The deliveries of many jobs by job id, in a few queries rather than one per job."""
    from sqlalchemy import select

    from dicom_node.joblog import DeliverySnapshot
    from dicom_node.joblog.tables import Delivery

    found: dict[int, list[DeliverySnapshot]] = {job_id: [] for job_id in job_ids}
    with joblog.reading() as session:
        for start in range(0, len(job_ids), _CHUNK):
            chunk = job_ids[start : start + _CHUNK]
            for row in session.scalars(select(Delivery).where(Delivery.job_id.in_(chunk)).order_by(Delivery.id)):
                found[row.job_id].append(DeliverySnapshot.of(row))
    return found
