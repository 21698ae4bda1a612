"""The trend plots of the dashboard, drawn on the server as SVG with matplotlib.

Each plot reads the job log for one filter (period, station, detector, profile) and returns the
image's bytes; the page links to it, so the dashboard needs no JavaScript and no internet. Figures
are made with `matplotlib.figure.Figure` directly, never pyplot: no global state shared between
the server's threads. An empty period gives a plot that says so rather than an error.
"""

from __future__ import annotations

import io
import math
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from matplotlib.axes import Axes
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter, date2num
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sqlalchemy import Select, select

from dicom_node.config import Config
from dicom_node.joblog import JobFilter, JobLog, JobStatus, QaSessionStatus
from dicom_node.joblog.tables import Delivery, DeliveryStatus, Job, QaSession

QC_TREND_FIGURES = ("calibration_gain_ratio", "noise_after", "method_noise_structure", "mean_ratio")
PHANTOM_FIGURES = ("mnse", "rn", "b2")
TOP_REASONS = 12
_REASON_CHARS = 70


def _number(value: Any) -> float | None:
    """A finite float, or None for anything else (NaN, text, a missing key) in stored JSON."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _svg(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    return buffer.getvalue()


def _empty(axes: Axes, text: str = "no data for this filter") -> None:
    axes.text(0.5, 0.5, text, ha="center", va="center", transform=axes.transAxes, color="0.4")
    axes.set_xticks([])
    axes.set_yticks([])


def _dates(axes: Axes) -> None:
    locator = AutoDateLocator()
    axes.xaxis.set_major_locator(locator)
    axes.xaxis.set_major_formatter(ConciseDateFormatter(locator))
    axes.set_xlabel("UTC")


def _rows(joblog: JobLog, where: JobFilter, *columns: Any) -> list[Any]:
    """These columns of every job in the filter."""
    query: Select[Any] = select(*columns)
    with joblog.reading() as session:
        return list(session.execute(where.apply(query)).all())


def _grid(rows: int, cols: int, title: str) -> tuple[Figure, list[Axes]]:
    figure = Figure(figsize=(max(9.0, 4.6 * cols), 3.2 * rows), layout="constrained")
    figure.suptitle(title)
    return figure, list(figure.subplots(rows, cols, squeeze=False).flat)


def stage_times(joblog: JobLog, where: JobFilter, config: Config) -> bytes:
    """How long each stage takes: decode, restore and derive per job, and each acknowledged send."""
    jobs = _rows(joblog, where, Job.decode_s, Job.restore_s, Job.derive_s)
    with joblog.reading() as session:
        sends = session.scalars(
            where.apply(select(Delivery.send_s).join(Job, Delivery.job_id == Job.id)).where(
                Delivery.status == DeliveryStatus.sent
            )
        ).all()
    columns = {
        "decode": [row[0] for row in jobs],
        "restore": [row[1] for row in jobs],
        "derive": [row[2] for row in jobs],
        "send": list(sends),
    }
    figure, axes = _grid(2, 2, "Stage times")
    for ax, (stage, raw) in zip(axes, columns.items(), strict=True):
        values = [v for v in map(_number, raw) if v is not None]
        ax.set_title(f"{stage} (n = {len(values)})")
        if values:
            ax.hist(values, bins=min(30, max(5, len(values))), color="#3b6ea5")
            ax.set_xlabel("seconds")
            ax.set_ylabel("count")
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        else:
            _empty(ax)
    return _svg(figure)


def images_per_day(joblog: JobLog, where: JobFilter, config: Config) -> bytes:
    """Images received per UTC day, stacked by their state now."""
    rows = _rows(joblog, where, Job.received_at, Job.status)
    counts: dict[str, Counter[datetime]] = defaultdict(Counter)
    for received_at, status in rows:
        day = received_at.replace(hour=0, minute=0, second=0, microsecond=0)
        counts[str(status)][day] += 1
    figure, (ax,) = _grid(1, 1, "Images received per day")
    if not rows:
        _empty(ax)
        return _svg(figure)
    days = sorted({day for per_status in counts.values() for day in per_status})
    bottom = [0] * len(days)
    for status in (s.value for s in JobStatus):
        if status in counts:
            heights = [counts[status][day] for day in days]
            ax.bar(date2num(days), heights, bottom=bottom, width=0.8, label=status)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set_ylabel("images")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize="small")
    _dates(ax)
    return _svg(figure)


def qc_over_time(joblog: JobLog, where: JobFilter, config: Config) -> bytes:
    """The QC figures that drift first, per station and detector, with their thresholds (dashed)."""
    rows = _rows(joblog, where, Job.received_at, Job.station_name, Job.calling_ae, Job.detector_serial, Job.qc)
    thresholds = config.qc.effective_thresholds
    figure, axes = _grid(2, 2, "QC figures per station and detector")
    for ax, name in zip(axes, QC_TREND_FIGURES, strict=True):
        series: dict[str, list[tuple[datetime, float]]] = defaultdict(list)
        for received_at, station, calling_ae, detector, qc in rows:
            value = _number((qc or {}).get(name))
            if value is not None:
                series[f"{station or calling_ae} / {detector or '-'}"].append((received_at, value))
        ax.set_title(name)
        if not series:
            _empty(ax)
            continue
        for label, points in sorted(series.items()):
            points.sort()
            ax.plot(date2num([p[0] for p in points]), [p[1] for p in points], marker=".", linestyle="-", label=label)
        threshold = thresholds.get(name)
        for bound in (threshold.min, threshold.max) if threshold else ():
            if bound is not None:
                ax.axhline(bound, color="#b03030", linestyle="--", linewidth=1)
        ax.legend(fontsize="x-small")
        _dates(ax)
    return _svg(figure)


def failures(joblog: JobLog, where: JobFilter, config: Config) -> bytes:
    """Why jobs failed: the failed jobs of the filter by their last error, most frequent first."""
    failed = replace(where, status=JobStatus.failed)
    with joblog.reading() as session:
        reasons = Counter(
            _short(error or "no reason recorded") for error in session.scalars(failed.apply(select(Job.last_error)))
        )
    figure, (ax,) = _grid(1, 1, "Failures by reason")
    if not reasons:
        _empty(ax, "no failed jobs for this filter")
        return _svg(figure)
    top = reasons.most_common(TOP_REASONS)[::-1]
    ax.barh([reason for reason, _ in top], [count for _, count in top], color="#b03030")
    ax.set_xlabel("failed jobs")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _svg(figure)


def _short(text: str) -> str:
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 1] + "…"


@dataclass(frozen=True)
class PhantomPoint:
    series: str  # "SN42 at 0.5 dose", or "SN42 full dose" (its residual noise: the level to reach)
    restored: bool  # False: the low-dose images only rescaled, what restoration improves on
    at: datetime
    figure: str  # one of PHANTOM_FIGURES
    value: float


def phantom_points(joblog: JobLog, where: JobFilter) -> list[PhantomPoint]:
    """The figures of every evaluated phantom QA session in the filter (`dicom_node.qa.phantom`).

    The stored result is read defensively: a figure missing, null or not a number is skipped,
    never an error on the page.
    """
    query = select(QaSession.detector_serial, QaSession.evaluated_at, QaSession.result).where(
        QaSession.status == QaSessionStatus.evaluated, QaSession.evaluated_at.is_not(None)
    )
    if where.since is not None:
        query = query.where(QaSession.evaluated_at >= where.since)
    if where.until is not None:
        query = query.where(QaSession.evaluated_at < where.until)
    if where.detector:
        query = query.where(QaSession.detector_serial == where.detector)
    if where.station:
        query = query.where(QaSession.station_name == where.station)
    with joblog.reading() as session:
        rows = session.execute(query).all()
    points: list[PhantomPoint] = []
    for detector, at, result in rows:
        if not isinstance(result, dict):
            continue
        name = detector or "-"
        full = result.get("full_dose")
        if isinstance(full, dict) and (rn := _number(full.get("rn"))) is not None:
            points.append(PhantomPoint(f"{name} full dose", True, at, "rn", rn))
        doses = result.get("doses")
        for dose in doses if isinstance(doses, list) else ():
            fraction = _number(dose.get("dose_fraction")) if isinstance(dose, dict) else None
            if fraction is None:
                continue
            for key, restored in (("restored", True), ("rescaled", False)):
                figures = dose.get(key)
                points.extend(
                    PhantomPoint(f"{name} at {fraction:.2g} dose", restored, at, figure, value)
                    for figure in PHANTOM_FIGURES
                    if isinstance(figures, dict) and (value := _number(figures.get(figure))) is not None
                )
    return points


def phantom_results(joblog: JobLog, where: JobFilter, config: Config) -> bytes:
    """Phantom QA over time: MNSE = RN + B² per detector and dose fraction, restored (solid) and
    only rescaled (dashed), with the full dose's residual noise (dotted) as the level to reach."""
    points = phantom_points(joblog, where)
    colours = {series: f"C{i % 10}" for i, series in enumerate(sorted({p.series for p in points}))}
    figure, axes = _grid(1, 3, "Phantom QA (seed-paper protocol)")
    for ax, name in zip(axes, PHANTOM_FIGURES, strict=True):
        ax.set_title({"mnse": "MNSE", "rn": "residual noise RN", "b2": "bias² B²"}[name])
        series: dict[tuple[str, bool], list[tuple[datetime, float]]] = defaultdict(list)
        for point in points:
            if point.figure == name:
                series[point.series, point.restored].append((point.at, point.value))
        if not series:
            _empty(ax)
            continue
        for (label, restored), values in sorted(series.items()):
            values.sort()
            full = label.endswith("full dose")
            ax.plot(
                date2num([v[0] for v in values]),
                [v[1] for v in values],
                color="0.3" if full else colours[label],
                linestyle=":" if full else "-" if restored else "--",
                marker="o" if restored else "x",
                label=label if restored else f"{label}, not restored",
            )
        ax.legend(fontsize="x-small")
        _dates(ax)
    return _svg(figure)


PLOTS: dict[str, Callable[[JobLog, JobFilter, Config], bytes]] = {
    "stage-times": stage_times,
    "images-per-day": images_per_day,
    "qc": qc_over_time,
    "failures": failures,
    "phantom": phantom_results,
}
"""Name in the URL (/plots/NAME.svg) → the function drawing it."""
