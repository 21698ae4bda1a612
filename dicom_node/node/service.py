"""Starts and supervises the parts of a running node: receiver, scheduler, worker processes.

The receiver and the scheduler (dispatch, retries, lease recovery, retention) run in this
process; restoration runs in separate worker processes, so a worker that crashes or is killed
never takes the receiver down. Dead workers are restarted; their jobs come back through lease
recovery.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
import time
from multiprocessing.context import SpawnProcess

from dicom_node.config import Config
from dicom_node.forward.dispatch import Dispatcher
from dicom_node.joblog import JobLog
from dicom_node.node.schedule import build_scheduler
from dicom_node.receive import StorageSCP
from dicom_node.tools.selftest import with_selftest

log = logging.getLogger("dicom_node.node.service")

SUPERVISE_EVERY_S = 1.0
WORKER_STOP_GRACE_S = 10.0


def _worker_process(config: Config) -> None:
    """Body of a worker process: stop cleanly (after the job in hand) on SIGTERM or SIGINT."""
    from dicom_node.node.logs import configure_logging
    from dicom_node.pipeline.worker import run_worker

    configure_logging()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    run_worker(config, stop)


class Node:
    def __init__(self, config: Config, port: int | None = None):
        self.config = config = with_selftest(config)
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.joblog = JobLog(config.database_url)
        self.receiver = StorageSCP(config, self.joblog, port=port)
        self.dispatcher = Dispatcher(config, self.joblog)
        self.scheduler = build_scheduler(config, self.joblog, self.dispatcher)
        self._context = multiprocessing.get_context("spawn")
        self.workers: list[SpawnProcess] = []
        self.restarts = 0

    @property
    def port(self) -> int:
        return self.receiver.port

    def start(self) -> None:
        self.joblog.reclaim_expired()  # jobs a previous run left half-done
        self.receiver.start()
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
            target=_worker_process, args=(self.config,), name=f"worker-{index}", daemon=True
        )
        process.start()
        return process

    def supervise_once(self) -> None:
        """Restart any worker process that has died."""
        for index, process in enumerate(self.workers):
            if not process.is_alive():
                log.error("worker %s died (exit code %s); restarting it", process.name, process.exitcode)
                self.workers[index] = self._start_worker(index)
                self.restarts += 1

    def stop(self) -> None:
        log.info("stopping node")
        self.receiver.stop()
        self.scheduler.shutdown(wait=True)
        for process in self.workers:
            process.terminate()
        deadline = time.monotonic() + WORKER_STOP_GRACE_S
        for process in self.workers:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()  # its lease expires and the job is reclaimed on the next start
                process.join(5)

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
