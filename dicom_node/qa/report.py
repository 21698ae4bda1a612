"""A period's report for QA staff and radiology IT: the job list and a summary per station.

Pure functions from job-log snapshots to a `Report`, and its renderers: Markdown (summary and
job list), CSV (the job list only, one row a job, for a spreadsheet) and HTML (one self-contained
page, no external assets, so it can be mailed or archived as it is). `dicom-node report` fetches
the jobs and writes the result (cli/report.py).

A station is the image's Station Name, else the calling AE title (what `JobFilter.station`
matches). Stage times are the seconds the job log recorded: decode, restore and derive once per
job (its last processing), send once per acknowledged send.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import jinja2

from dicom_node.joblog import DeliverySnapshot, DeliveryStatus, JobSnapshot, JobStatus

STAGES = ("decode", "restore", "derive", "send")
ALL_STATIONS = "(all)"
"""The label of the summary over every station (parentheses: no Station Name looks like it)."""

CSV_COLUMNS = (
    "job",
    "received_at",
    "station",
    "calling_ae",
    "detector",
    "profile",
    "pipeline",
    "status",
    "attempts",
    "decode_s",
    "restore_s",
    "derive_s",
    "send_s",
    "sent_to",
    "qc_flags",
    "last_error",
)


@dataclass(frozen=True)
class StageTimes:
    """How long one stage took over a set of jobs: how many times were recorded, median and p95 (s)."""

    count: int
    median: float | None
    p95: float | None


@dataclass(frozen=True)
class JobRow:
    """One line of the job list. `send_s` is the job's longest acknowledged send."""

    id: int
    received_at: datetime
    station: str
    calling_ae: str
    detector: str | None
    profile: str
    pipeline: str | None
    status: str
    attempts: int
    decode_s: float | None
    restore_s: float | None
    derive_s: float | None
    send_s: float | None
    sent_to: tuple[str, ...]  # the destinations that acknowledged a send
    qc_flags: tuple[str, ...]  # the flagged QC figures
    last_error: str | None


@dataclass(frozen=True)
class StationSummary:
    station: str
    jobs: int
    statuses: dict[str, int]  # every job state, 0 included
    stages: dict[str, StageTimes]  # STAGES, in order
    qc_flagged: int  # jobs with at least one QC flag
    flag_figures: dict[str, int]  # flagged jobs per QC figure
    retried: int  # jobs claimed more than once


@dataclass(frozen=True)
class Report:
    generated_at: datetime
    since: datetime | None
    until: datetime | None
    station: str | None  # the station the report is restricted to
    jobs: list[JobRow]  # oldest first
    stations: list[StationSummary]  # by station name
    total: StationSummary  # every job of the report

    @property
    def period(self) -> str:
        """ "from 2026-11-01 00:00 to 2026-12-01 00:00 UTC", open ends said in words."""
        start = _minute(self.since) if self.since else "the start of the job log"
        end = _minute(self.until) if self.until else _minute(self.generated_at)
        return f"from {start} to {end} UTC"


def station_of(job: JobSnapshot) -> str:
    return job.station_name or job.calling_ae


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-quantile (0 ≤ q ≤ 1) by linear interpolation between the closest ranks (numpy's
    default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def stage_times(values: Iterable[float | None]) -> StageTimes:
    recorded = [value for value in values if value is not None]
    return StageTimes(len(recorded), percentile(recorded, 0.5), percentile(recorded, 0.95))


def _sends(deliveries: Sequence[DeliverySnapshot]) -> list[DeliverySnapshot]:
    return [d for d in deliveries if d.status == DeliveryStatus.sent]


def _flag_figures(job: JobSnapshot) -> tuple[str, ...]:
    return tuple(dict.fromkeys(str(flag.get("figure")) for flag in job.qc_flags or () if isinstance(flag, dict)))


def job_row(job: JobSnapshot, deliveries: Sequence[DeliverySnapshot]) -> JobRow:
    sends = _sends(deliveries)
    send_times = [d.send_s for d in sends if d.send_s is not None]
    return JobRow(
        id=job.id,
        received_at=job.received_at,
        station=station_of(job),
        calling_ae=job.calling_ae,
        detector=job.detector_serial,
        profile=job.profile,
        pipeline=job.pipeline,
        status=str(job.status),
        attempts=job.attempts,
        decode_s=job.decode_s,
        restore_s=job.restore_s,
        derive_s=job.derive_s,
        send_s=max(send_times) if send_times else None,
        sent_to=tuple(dict.fromkeys(d.destination for d in sends)),
        qc_flags=_flag_figures(job),
        last_error=job.last_error,
    )


def summarise(
    station: str, jobs: Sequence[JobSnapshot], deliveries: Mapping[int, Sequence[DeliverySnapshot]]
) -> StationSummary:
    statuses = {status.value: 0 for status in JobStatus}
    figures: dict[str, int] = {}
    for job in jobs:
        statuses[str(job.status)] += 1
        for figure in _flag_figures(job):
            figures[figure] = figures.get(figure, 0) + 1
    send_times = [d.send_s for job in jobs for d in _sends(deliveries.get(job.id, ()))]
    return StationSummary(
        station=station,
        jobs=len(jobs),
        statuses=statuses,
        stages={
            "decode": stage_times(job.decode_s for job in jobs),
            "restore": stage_times(job.restore_s for job in jobs),
            "derive": stage_times(job.derive_s for job in jobs),
            "send": stage_times(send_times),
        },
        qc_flagged=sum(1 for job in jobs if job.qc_flags),
        flag_figures=dict(sorted(figures.items())),
        retried=sum(1 for job in jobs if job.attempts > 1),
    )


def build_report(
    jobs: Sequence[JobSnapshot],
    deliveries: Mapping[int, Sequence[DeliverySnapshot]],
    *,
    generated_at: datetime,
    since: datetime | None = None,
    until: datetime | None = None,
    station: str | None = None,
) -> Report:
    """The report of `jobs` (already selected for the period and station) with their deliveries by job id."""
    ordered = sorted(jobs, key=lambda job: job.id)
    by_station: dict[str, list[JobSnapshot]] = {}
    for job in ordered:
        by_station.setdefault(station_of(job), []).append(job)
    return Report(
        generated_at=generated_at,
        since=since,
        until=until,
        station=station,
        jobs=[job_row(job, deliveries.get(job.id, ())) for job in ordered],
        stations=[summarise(name, by_station[name], deliveries) for name in sorted(by_station)],
        total=summarise(ALL_STATIONS, ordered, deliveries),
    )


# Rendering


def _minute(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M")


def seconds(value: float | None) -> str:
    """A duration for people: "1.25", or "-" when none was recorded."""
    return "-" if value is None else f"{value:.2f}"


def flags_text(summary: StationSummary) -> str:
    """ "3 (snr_gain 2, mean_ratio 1)", or "0"."""
    if not summary.flag_figures:
        return str(summary.qc_flagged)
    figures = ", ".join(f"{figure} {count}" for figure, count in summary.flag_figures.items())
    return f"{summary.qc_flagged} ({figures})"


def _cell(text: object) -> str:
    """A Markdown table cell: one line; pipes escaped (they would split the row), and "<" (a
    renderer would take what follows for HTML)."""
    one_line = " ".join(str(text).split())
    return one_line.replace("\\", "\\\\").replace("|", "\\|").replace("<", "\\<")


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return lines


def render_markdown(report: Report) -> str:
    summaries = [*report.stations, report.total] if report.stations else []
    scope = f", at station {report.station}" if report.station else ""
    lines = [
        "# dicom-node report",
        "",
        f"{len(report.jobs)} jobs received {report.period}{scope}. Generated {_minute(report.generated_at)} UTC.",
        "",
        "## Jobs by station",
        "",
        *_table(
            ["Station", "Jobs", *(status.value for status in JobStatus), "Retried", "QC flagged"],
            (
                [s.station, s.jobs, *(s.statuses[status.value] for status in JobStatus), s.retried, flags_text(s)]
                for s in summaries
            ),
        ),
        "",
        "## Stage times (s)",
        "",
        *_table(
            ["Station", "Stage", "Count", "Median", "p95"],
            (
                [s.station, stage, times.count, seconds(times.median), seconds(times.p95)]
                for s in summaries
                for stage, times in s.stages.items()
            ),
        ),
        "",
        "## Jobs",
        "",
        *_table(
            [
                "Job",
                "Received (UTC)",
                "Station",
                "Profile",
                "Status",
                "Tries",
                "Decode",
                "Restore",
                "Derive",
                "Send",
                "Sent to",
                "QC flags",
                "Last error",
            ],
            (
                [
                    job.id,
                    job.received_at.strftime("%Y-%m-%d %H:%M:%S"),
                    job.station,
                    job.profile,
                    job.status,
                    job.attempts,
                    seconds(job.decode_s),
                    seconds(job.restore_s),
                    seconds(job.derive_s),
                    seconds(job.send_s),
                    ", ".join(job.sent_to) or "-",
                    ", ".join(job.qc_flags) or "-",
                    job.last_error or "-",
                ]
                for job in report.jobs
            ),
        ),
    ]
    return "\n".join(lines) + "\n"


def _csv_number(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def render_csv(report: Report) -> str:
    """The job list, one row a job under a header row (CSV_COLUMNS); times in seconds, empty when
    not recorded, received_at ISO 8601 UTC, lists joined with ";". The summary is not in it: a
    spreadsheet computes it from these rows, and Markdown and HTML show it."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for job in report.jobs:
        writer.writerow(
            [
                job.id,
                job.received_at.isoformat(timespec="seconds"),
                job.station,
                job.calling_ae,
                job.detector or "",
                job.profile,
                job.pipeline or "",
                job.status,
                job.attempts,
                _csv_number(job.decode_s),
                _csv_number(job.restore_s),
                _csv_number(job.derive_s),
                _csv_number(job.send_s),
                ";".join(job.sent_to),
                ";".join(job.qc_flags),
                job.last_error or "",
            ]
        )
    return out.getvalue()


_ENVIRONMENT = jinja2.Environment(
    loader=jinja2.PackageLoader("dicom_node.qa", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def render_html(report: Report) -> str:
    """One self-contained page (styles inline, no scripts or external assets), every value escaped."""
    template = _ENVIRONMENT.get_template("report.html")
    return template.render(
        report=report,
        summaries=[*report.stations, report.total] if report.stations else [],
        statuses=[status.value for status in JobStatus],
        seconds=seconds,
        flags_text=flags_text,
    )


RENDERERS = {"md": render_markdown, "csv": render_csv, "html": render_html}
