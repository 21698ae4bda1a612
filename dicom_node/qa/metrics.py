"""Prometheus metrics of the node, served on the dashboard's /metrics (docs/metrics.md lists them).

Everything the job log knows is read from the database at scrape time by `JobLogCollector`, so
worker processes need no metrics server of their own and the figures survive restarts. Its
counters are counts of job-log rows (jobs, sends, events): they only grow while rows are kept,
and a clean-up that deletes old rows makes them drop, which Prometheus takes as a counter reset.
Associations are known only to the receiver, which counts them live (`receive.counters`); the
serve process runs both, and `build_registry` serves both. GPU memory comes from NVML when
nvidia-ml-py is installed; torch is never imported here (this runs in the serve process).
"""

from __future__ import annotations

import importlib
import logging
import shutil
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import and_, case, func, not_, or_, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from dicom_node.config import Config
from dicom_node.joblog import DeliveryStatus, JobLog, JobStatus
from dicom_node.joblog.tables import Delivery, Job, JobEvent
from dicom_node.receive import counters

log = logging.getLogger("dicom_node.qa.metrics")

STAGE_BUCKETS_S: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
"""Upper bounds of the stage latency histograms: from a fast decode to a large image restored on a CPU."""

QUEUE_STATES = (JobStatus.received, JobStatus.processing, JobStatus.forwarding, JobStatus.held)
"""The states of a job that is not finished: the queue."""

_JOB_STAGES: dict[str, InstrumentedAttribute[float | None]] = {
    "decode": Job.decode_s,
    "restore": Job.restore_s,
    "derive": Job.derive_s,
}


def build_registry(config: Config, joblog: JobLog) -> CollectorRegistry:
    """The registry /metrics serves in the serve process: job log, receiver, disk, GPU, process."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobLogCollector(config, joblog))
    registry.register(_Registries(counters.REGISTRY))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


class _Registries(Collector):
    """Serves the metrics of other registries (the receiver's live counters) as one's own."""

    def __init__(self, *registries: CollectorRegistry) -> None:
        self.registries = registries

    def collect(self) -> Iterable[Metric]:
        for registry in self.registries:
            yield from registry.collect()


class JobLogCollector(Collector):
    """Reads the job log, the data folder's disk and the GPUs each time Prometheus scrapes.

    A job log that cannot be read makes `dicom_node_joblog_up` 0 and leaves its metrics out, so
    the scrape itself (disk, GPU, receiver) still succeeds and an alert can say what is wrong.
    """

    def __init__(self, config: Config, joblog: JobLog) -> None:
        self.config = config
        self.joblog = joblog

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("dicom_node_joblog_up", "1 when the job log could be read for this scrape, else 0.")
        try:
            with self.joblog.reading() as session:
                metrics = list(self._joblog_metrics(session, datetime.now(UTC)))
        except Exception:
            log.exception("metrics: reading the job log failed")
            metrics = []
            up.add_metric([], 0)
        else:
            up.add_metric([], 1)
        yield up
        yield from metrics
        yield from self._disk_metrics()
        yield from gpu_metrics()

    def _joblog_metrics(self, session: Session, now: datetime) -> Iterator[Metric]:
        received = CounterMetricFamily(
            "dicom_node_instances_received", "Images received and recorded as jobs (identical duplicates make none)."
        )
        received.add_metric([], session.scalar(select(func.count(Job.id))) or 0)
        yield received

        events = dict(session.execute(select(JobEvent.kind, func.count(JobEvent.id)).group_by(JobEvent.kind)).all())
        restored = CounterMetricFamily(
            "dicom_node_instances_restored", "Restorations recorded (a reprocess counts again)."
        )
        restored.add_metric([], events.get("restored", 0))
        yield restored

        forwarded = CounterMetricFamily(
            "dicom_node_instances_forwarded",
            "Sends acknowledged by a destination, by destination and kind (derived or original).",
            labels=["destination", "kind"],
        )
        sent = session.execute(
            select(Delivery.destination, Delivery.kind, func.count(Delivery.id))
            .where(Delivery.status == DeliveryStatus.sent)
            .group_by(Delivery.destination, Delivery.kind)
        ).all()
        for destination, kind, count in sent:
            forwarded.add_metric([destination, kind], count)
        yield forwarded

        # jobs.py writes the outcome at the end of these events' detail: "…; failed" (no retry),
        # "…; gave up" (a send), "…; retry at <time>"; a lease that ran out on the last attempt is "failed".
        failed_processing, failed_sending, retried_sending, retried_processing = (
            session.scalar(select(func.count(JobEvent.id)).where(condition)) or 0
            for condition in (
                or_(
                    JobEvent.kind == "failed",
                    and_(JobEvent.kind == "attempt-failed", JobEvent.detail.like("%; failed")),
                ),
                and_(JobEvent.kind == "send-failed", JobEvent.detail.like("%; gave up")),
                and_(JobEvent.kind == "send-failed", JobEvent.detail.like("%; retry at %")),
                and_(JobEvent.kind == "claimed", not_(JobEvent.detail.like("attempt 1 of %"))),
            )
        )
        failed = CounterMetricFamily(
            "dicom_node_instances_failed",
            "Jobs that failed for good, by stage (processing, or a send that gave up).",
            labels=["stage"],
        )
        failed.add_metric(["processing"], failed_processing)
        failed.add_metric(["sending"], failed_sending)
        yield failed

        retries = CounterMetricFamily(
            "dicom_node_retries",
            "Attempts after a failure: a job claimed again (attempt 2 or later), a send scheduled again.",
            labels=["stage"],
        )
        retries.add_metric(["processing"], retried_processing)
        retries.add_metric(["sending"], retried_sending)
        yield retries

        flagged = CounterMetricFamily("dicom_node_qc_flagged", "Restorations with at least one QC figure flagged.")
        flagged.add_metric([], events.get("qc-flagged", 0))
        yield flagged

        history = CounterMetricFamily(
            "dicom_node_job_events",
            "Lines of job history by kind (received, claimed, restored, sent, send-failed, retry, cancel, …).",
            labels=["kind"],
        )
        for kind, count in sorted(events.items()):
            history.add_metric([kind], count)
        yield history

        yield from self._state_metrics(session, now)
        yield from _flag_figures(session)
        yield _stage_histogram(session)

    def _state_metrics(self, session: Session, now: datetime) -> Iterator[Metric]:
        jobs = GaugeMetricFamily(
            "dicom_node_jobs",
            "Jobs by state now; received, processing, forwarding and held are the queue.",
            labels=["status"],
        )
        by_status = dict(session.execute(select(Job.status, func.count(Job.id)).group_by(Job.status)).all())
        for status in JobStatus:
            jobs.add_metric([status.value], by_status.get(status, 0))
        yield jobs

        oldest = GaugeMetricFamily(
            "dicom_node_oldest_job_age_seconds",
            "Age (since received) of the oldest job in each queue state; 0 when the state has none.",
            labels=["status"],
        )
        first = dict(
            session.execute(
                select(Job.status, func.min(Job.received_at)).where(Job.status.in_(QUEUE_STATES)).group_by(Job.status)
            ).all()
        )
        for status in QUEUE_STATES:
            at = first.get(status)
            oldest.add_metric([status.value], max(0.0, (now - at).total_seconds()) if at is not None else 0.0)
        yield oldest

        deliveries = GaugeMetricFamily("dicom_node_deliveries", "Sends by state now.", labels=["status"])
        sends = dict(session.execute(select(Delivery.status, func.count(Delivery.id)).group_by(Delivery.status)).all())
        for delivery_status in DeliveryStatus:
            deliveries.add_metric([delivery_status.value], sends.get(delivery_status, 0))
        yield deliveries

    def _disk_metrics(self) -> Iterator[Metric]:
        data_dir = self.config.data_dir
        try:
            usage = shutil.disk_usage(data_dir)
        except OSError as exc:
            log.warning("metrics: no disk usage of %s: %s", data_dir, exc)
            return
        free = GaugeMetricFamily(
            "dicom_node_disk_free_bytes", "Free bytes on the file system of data_dir.", labels=["path"]
        )
        free.add_metric([str(data_dir)], usage.free)
        yield free
        total = GaugeMetricFamily(
            "dicom_node_disk_total_bytes", "Size of the file system of data_dir.", labels=["path"]
        )
        total.add_metric([str(data_dir)], usage.total)
        yield total
        minimum = GaugeMetricFamily(
            "dicom_node_disk_min_free_bytes",
            "[node] min_free_disk_mb in bytes: below it the receiver rejects associations.",
        )
        minimum.add_metric([], self.config.node.min_free_disk_mb * (1 << 20))
        yield minimum


def _flag_figures(session: Session) -> Iterator[Metric]:
    """Flagged jobs by QC figure, read from the flagged jobs' qc_flags (few: the flags are exceptions)."""
    figures: dict[str, int] = {}
    for flags in session.scalars(select(Job.qc_flags).where(Job.qc_flags.is_not(None))):
        for figure in {str(flag.get("figure")) for flag in flags or () if isinstance(flag, dict)}:
            figures[figure] = figures.get(figure, 0) + 1
    metric = GaugeMetricFamily(
        "dicom_node_qc_flagged_jobs",
        "Jobs in the job log whose last restoration flagged this QC figure.",
        labels=["figure"],
    )
    for figure, count in sorted(figures.items()):
        metric.add_metric([figure], count)
    yield metric


def _stage_histogram(session: Session) -> Metric:
    """Stage durations as a histogram, its buckets counted by SQL (sum(case when x <= le))."""
    histogram = HistogramMetricFamily(
        "dicom_node_stage_duration_seconds",
        "Duration of each stage of the jobs in the job log: decode, restore, derive (per job), send (per send).",
        labels=["stage"],
    )
    columns: list[tuple[str, Any]] = [*_JOB_STAGES.items(), ("send", Delivery.send_s)]
    for stage, column in columns:
        row = session.execute(
            select(
                func.count(column),
                func.coalesce(func.sum(column), 0.0),
                *(func.coalesce(func.sum(case((column <= le, 1), else_=0)), 0) for le in STAGE_BUCKETS_S),
            ).where(column.is_not(None))
        ).one()
        count, total, *cumulative = row
        buckets = [(_le(le), int(n)) for le, n in zip(STAGE_BUCKETS_S, cumulative, strict=True)]
        histogram.add_metric([stage], [*buckets, ("+Inf", int(count))], float(total))
    return histogram


def _le(bound: float) -> str:
    """A bucket bound as Prometheus writes it (5 → "5.0")."""
    return repr(float(bound))


def gpu_metrics() -> Sequence[Metric]:
    """GPU memory per device from NVML (nvidia-ml-py's `pynvml`); none when it is not installed or
    there is no NVIDIA driver. NVML reads the driver's figures, without a CUDA context."""
    try:
        nvml: Any = importlib.import_module("pynvml")
        nvml.nvmlInit()
    except Exception:
        return []
    used = GaugeMetricFamily(
        "dicom_node_gpu_memory_used_bytes", "GPU memory in use (all processes).", labels=["gpu", "name"]
    )
    total = GaugeMetricFamily("dicom_node_gpu_memory_total_bytes", "GPU memory in all.", labels=["gpu", "name"])
    try:
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = nvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else str(name)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            used.add_metric([str(index), name], memory.used)
            total.add_metric([str(index), name], memory.total)
    except Exception as exc:
        log.warning("metrics: reading GPU memory failed: %s", exc)
        return []
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            log.debug("metrics: nvmlShutdown failed", exc_info=True)
    return [used, total]
