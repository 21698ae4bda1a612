"""A node run as IT runs it (`dicom-node serve` in its own process, with its configuration file),
for the end-to-end and fault tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from dicom_node.config import load_config
from dicom_node.joblog import JobLog

from dicomtools import low_dose_mammogram, sim_noise_model
from peers import wait_for_port, wait_until

NODE_BIN = str(Path(sys.executable).with_name("dicom-node"))


def write_config(
    folder: Path,
    node_port: int,
    pacs_port: int,
    *,
    lease_s: float = 30,
    send_timeout_s: float = 10,
    selftest_port: int = 11113,
    forward_original: bool = False,
    pipeline: str = "gat-bm3d",
    workers: int = 1,
    max_attempts: int = 3,
    stop_grace_s: float = 20,
    timeout_s: float = 900,
    retry_initial_s: float = 1,
    pass_through: tuple[str, ...] = (),
) -> Path:
    path = folder / "node.toml"
    sim = sim_noise_model()  # the detector the inputs come from
    path.write_text(f"""
[node]
ae_title = "DOSENODE"
port = {node_port}
bind = "127.0.0.1"
data_dir = "data"
min_free_disk_mb = 1

[[sources]]
ae_title = "MAMMO1"
hosts = ["127.0.0.0/8"]
profile = "half-dose"

[[destinations]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {pacs_port}
timeout_s = {send_timeout_s}

[profiles.half-dose]
pipeline = "{pipeline}"
dose_fraction = 0.5
destinations = ["pacs"]
forward_original = {str(forward_original).lower()}
pass_through = {json.dumps(list(pass_through))}

[detectors.SIM-0001]
gain = {sim.gain}
electronic_noise = {sim.electronic_noise}
offset = {sim.offset}

[worker]
count = {workers}
lease_s = {lease_s}
heartbeat_s = 1
max_attempts = {max_attempts}
stop_grace_s = {stop_grace_s}
timeout_s = {timeout_s}

[selftest]
receiver_port = {selftest_port}

[retry]
initial_s = {retry_initial_s}
multiplier = 1.5
jitter = 0
max_delay_s = {max(3, retry_initial_s)}
max_age_h = 1
""")
    return path


class RunningNode:
    def __init__(self, folder: Path, config_path: Path, port: int):
        self.folder, self.config_path, self.port = folder, config_path, port
        self.log_path = folder / "node.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> RunningNode:
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen(
                [NODE_BIN, "serve", "--config", str(self.config_path)],
                stdout=log,
                stderr=log,
                cwd=self.folder,
                start_new_session=True,  # its own process group: `kill` takes the workers with it
            )
        wait_for_port(self.port, self.process, 60, "the node", details=lambda: f":\n{self.log()[-3000:]}")
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(40)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def kill(self) -> None:
        """kill -9 of the whole node: receiver, scheduler, forwarder and worker processes at once."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def log(self) -> str:
        return self.log_path.read_text()

    def joblog(self) -> JobLog:
        return JobLog(load_config(self.config_path).database_url)

    def wait_for_jobs(self, count: int, status: str = "done", timeout: float = 240) -> list:
        jobs = []

        def all_reached() -> list:
            jobs[:] = self.joblog().list_jobs(limit=None)
            return list(jobs) if len(jobs) >= count and all(str(j.status) == status for j in jobs) else []

        return wait_until(
            all_reached,
            timeout,
            interval=0.5,
            message=lambda: (
                f"jobs did not all reach {status}: {[(j.id, str(j.status), j.last_error) for j in jobs]}\n"
                f"{self.log()[-4000:]}"
            ),
        )

    def deliveries(self) -> list:
        """Every delivery of every job."""
        joblog = self.joblog()
        return [d for j in joblog.list_jobs(limit=None) for d in joblog.deliveries(j.id)]

    def worker_pids(self) -> list[int]:
        children = subprocess.run(
            ["ps", "-ww", "-o", "pid=,args=", "--ppid", str(self.process.pid)], capture_output=True, text=True
        ).stdout.splitlines()
        return [int(line.split()[0]) for line in children if "spawn_main" in line]


def make_input(folder: Path, seed: int, shape=(256, 208)) -> Path:
    """A half-dose phantom mammogram from the simulated detector SIM-0001."""
    return low_dose_mammogram(folder / f"low-dose-{seed}.dcm", seed, shape, dose_fraction=0.5, dose_label="50% dose")
