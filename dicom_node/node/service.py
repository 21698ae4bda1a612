"""Starts and supervises the parts of a running node: receiver, scheduler, worker processes.

The receiver and the scheduler (dispatch, retries, lease recovery, retention) run in this
process; restoration runs in separate worker processes, so a worker that crashes or is killed
never takes the receiver down. A dead worker's job is given back at once, its attempt counted
(the cap fails an image that keeps killing workers, with the reason), and the worker restarted.

The node has an identity that outlives it (`node_identity`, a file in data_dir) and its workers'
leases carry it, so a node that starts again after being killed gives back at once the jobs its
previous run held, instead of waiting for their leases to run out. On stop, workers finish the
job in hand within `[worker] stop_grace_s`; one that does not is killed and its job handed back
(not counted: the stop was not the job's fault).
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
import time
import uuid
from multiprocessing.context import SpawnProcess
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_node.audit import record_config_loaded
from dicom_node.config import Config
from dicom_node.files import write_atomically
from dicom_node.forward.commitment import CommitmentListener
from dicom_node.forward.dispatch import Dispatcher
from dicom_node.joblog import JobLog
from dicom_node.node.schedule import build_scheduler
from dicom_node.receive import StorageSCP
from dicom_node.tools.selftest import with_selftest

if TYPE_CHECKING:
    from dicom_node.qa.web import DashboardServer

log = logging.getLogger("dicom_node.node.service")

SUPERVISE_EVERY_S = 1.0
NODE_ID_FILE = "node-id"


def node_identity(data_dir: Path) -> str:
    """This node's name across restarts: made once (random) and kept in data_dir."""
    path = data_dir / NODE_ID_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        identity = uuid.uuid4().hex[:12]
        write_atomically(path, f"{identity}\n".encode(), mode=0o644)
        return identity


def exit_reason(exitcode: int | None) -> str:
    """How a worker process ended, in words: "worker killed by signal 11 (SIGSEGV)"."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "unknown"
        return f"worker killed by signal {-exitcode} ({name})"
    return f"worker exited with code {exitcode}"


def _worker_process(config: Config, node_id: str) -> None:
    """Body of a worker process: stop cleanly (after the job in hand) on SIGTERM or SIGINT."""
    from dicom_node.node.logs import configure_logging
    from dicom_node.pipeline.worker import run_worker

    configure_logging()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    run_worker(config, stop, node_id)


class Node:
    def __init__(self, config: Config, port: int | None = None):
        self.config = config = with_selftest(config)
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.node_id = node_identity(config.data_dir)
        self.joblog = JobLog(config.database_url, config.worker.max_attempts, config.database.busy_timeout_s)
        self.dispatcher = Dispatcher(config, self.joblog)
        self.receiver = StorageSCP(
            config, self.joblog, port=port, commitment_reports=CommitmentListener(self.dispatcher).on_report
        )
        self.scheduler = build_scheduler(config, self.joblog, self.dispatcher)
        self._context = multiprocessing.get_context("spawn")
        self.workers: list[SpawnProcess] = []
        self.restarts = 0
        self.dashboard: DashboardServer | None = None

    @property
    def port(self) -> int:
        return self.receiver.port

    def start(self) -> None:
        if self.config.dashboard.enabled:  # first: a port in use stops the start before anything runs
            from dicom_node.qa.web import start_dashboard

            self.dashboard = start_dashboard(self.config, self.joblog)
        # jobs this node's previous run held (it was killed, or lost power): back now, not after their lease
        for job_id in self.joblog.hand_back(f"{self.node_id}/", "the node stopped while it held the job", prefix=True):
            log.warning("job %s: held when the node last stopped; given back to the queue", job_id)
        self.joblog.reclaim_expired()  # and any other worker's that ran out
        record_config_loaded(self.config, self.joblog, "serve")
        try:
            self.receiver.start()
        except BaseException:  # e.g. the DICOM port is taken: the dashboard does not outlive a failed start
            if self.dashboard is not None:
                self.dashboard.stop()
            raise
        self.scheduler.start()
        self.workers = [self._start_worker(i) for i in range(self.config.worker.count)]
        log.info(
            "node %s listening on %s:%d with %d workers",
            self.config.node.ae_title,
            self.config.node.bind,
            self.port,
            len(self.workers),
        )

    def _start_worker(self, index: int) -> SpawnProcess:
        process = self._context.Process(
            target=_worker_process, args=(self.config, self.node_id), name=f"worker-{index}", daemon=True
        )
        process.start()
        return process

    def _lease_owner(self, process: SpawnProcess) -> str:
        from dicom_node.pipeline.worker import worker_name

        return worker_name(self.node_id, process.pid)

    def supervise_once(self) -> None:
        """Give back the job of any worker process that has died (an attempt counted), and restart it."""
        for index, process in enumerate(self.workers):
            if not process.is_alive():
                reason = exit_reason(process.exitcode)
                log.error("%s: %s; restarting it", process.name, reason)
                for job_id in self.joblog.hand_back(self._lease_owner(process), reason):
                    job = self.joblog.get_job(job_id)
                    log.error("job %s: %s (%s)", job_id, reason, job.status if job else "gone")
                self.workers[index] = self._start_worker(index)
                self.restarts += 1

    def stop(self) -> None:
        grace = self.config.worker.stop_grace_s
        log.info("stopping node: workers have %g s to finish the job in hand", grace)
        if self.dashboard is not None:
            self.dashboard.stop()
        self.receiver.stop()
        self.scheduler.shutdown(wait=True)
        for process in self.workers:
            process.terminate()  # SIGTERM: finish the job in hand, take no other
        deadline = time.monotonic() + grace
        for process in self.workers:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(5)
                for job_id in self.joblog.hand_back(
                    self._lease_owner(process), "the node stopped before the job finished", counts=False
                ):
                    log.warning("job %s: not finished within %g s of the stop; handed back to the queue", job_id, grace)

    def run(self, stop: threading.Event) -> None:
        self.start()
        try:
            while not stop.wait(SUPERVISE_EVERY_S):
                self.supervise_once()
        finally:
            self.stop()


def serve(config: Config) -> None:
    """Run the node until SIGTERM or SIGINT."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    Node(config).run(stop)
