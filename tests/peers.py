"""Real DICOM peers for integration tests: Orthanc as the PACS, DCMTK storescu as the modality,
DCMTK storescp as a plain receiver; and `wait_until`, the one way the tests wait for something.

Each peer runs on free loopback ports in a temporary folder and is stopped by its fixture (see
conftest.py). A missing Debian package fails the test and names the package (never a skip).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

GDCM_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancGdcm.so")

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require(binary: str, package: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"{binary} is not installed; apt-get install -y --no-install-recommends {package}", pytrace=False)
    return path


def wait_until(
    condition: Callable[[], T],
    timeout: float,
    interval: float = 0.1,
    message: str | Callable[[], str] = "the condition was never met",
) -> T:
    """Call `condition` every `interval` s until it returns something truthy, and return that.

    After `timeout` s the test fails with `message` (a callable is called then, so that it can show
    the state at that moment, e.g. a log's tail). The condition may itself fail the test early,
    e.g. when the process it waits for has exited.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"waited {timeout:g} s: {message() if callable(message) else message}")
        time.sleep(min(interval, left))


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on the port."""
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def wait_for_port(
    port: int,
    process: subprocess.Popen | None = None,
    timeout: float = 30,
    what: str = "the server",
    details: Callable[[], str] = lambda: "",
) -> None:
    """Wait until `process` listens on the loopback port; fail at once if it exits first."""

    def up() -> bool:
        if process is not None and process.poll() is not None:
            pytest.fail(f"{what} exited with {process.returncode} before listening on port {port}{details()}")
        return listening(port)

    wait_until(up, timeout, interval=0.05, message=lambda: f"{what} did not listen on port {port}{details()}")


class Orthanc:
    """A throwaway Orthanc on loopback: DICOM port, REST API, storage under `folder`."""

    def __init__(self, folder: Path, aet: str = "ORTHANC", modalities: dict | None = None):
        self.folder = folder
        self.aet = aet
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.modalities = modalities or {}
        self.process: subprocess.Popen | None = None

    def start(self) -> Orthanc:
        binary = require("Orthanc", "orthanc")
        config = {
            "Name": "test-pacs",
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": self.modalities,
            "Plugins": [str(GDCM_PLUGIN)] if GDCM_PLUGIN.exists() else [],
            "HttpServerEnabled": True,
            "StableAge": 1,
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "orthanc.json").write_text(json.dumps(config))
        with open(self.folder / "orthanc.log", "w") as log:  # Orthanc writes to its own copy of the handle
            self.process = subprocess.Popen([binary, str(self.folder / "orthanc.json")], stdout=log, stderr=log)

        def answering() -> bool:
            if self.process.poll() is not None:
                pytest.fail(f"Orthanc exited with {self.process.returncode}: {self.log()}")
            try:
                self.get("/system")
                return True
            except OSError:
                return False

        try:
            wait_until(answering, 20, interval=0.1, message=lambda: f"Orthanc did not start: {self.log()}")
        except BaseException:  # pytest.fail raises an OutcomeException, not an Exception
            self.stop()
            raise
        return self

    def log(self) -> str:
        return (self.folder / "orthanc.log").read_text()[-2000:]

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def request(self, path: str, method: str = "GET", body: bytes | None = None, accept: str | None = None) -> bytes:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method)
        if accept:
            req.add_header("Accept", accept)
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.read()

    def get(self, path: str):
        return json.loads(self.request(path))

    def instances(self) -> list[str]:
        return self.get("/instances")

    def find(self, sop_instance_uid: str) -> str | None:
        """Orthanc's id of the instance with this SOP Instance UID, or None."""
        try:
            found = json.loads(self.request("/tools/lookup", "POST", sop_instance_uid.encode()))
        except urllib.error.HTTPError:
            return None
        ids = [item["ID"] for item in found if item["Type"] == "Instance"]
        return ids[0] if ids else None

    def wait_for(self, sop_instance_uid: str, timeout: float = 60) -> str:
        """Orthanc's id of the instance, once it has arrived."""
        return wait_until(
            lambda: self.find(sop_instance_uid),
            timeout,
            interval=0.2,
            message=f"Orthanc never received {sop_instance_uid}",
        )

    def tags(self, orthanc_id: str) -> dict:
        return self.get(f"/instances/{orthanc_id}/simplified-tags")

    def file(self, orthanc_id: str) -> bytes:
        return self.request(f"/instances/{orthanc_id}/file")


def storescu(
    node_port: int, *files: Path, calling: str = "MAMMO1", called: str = "DOSENODE", options: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """DCMTK storescu as the modality; returns the completed process (its output names statuses)."""
    binary = require("storescu", "dcmtk")
    return subprocess.run(
        [binary, "-R", "-aet", calling, "-aec", called, *options, "127.0.0.1", str(node_port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@dataclass
class Storescp:
    """A running DCMTK storescp: it writes every image it receives into `folder`."""

    port: int
    folder: Path
    process: subprocess.Popen
    ae_title: str = "STORESCP"

    def received(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


def start_storescp(folder: Path, *options: str, ae_title: str = "STORESCP") -> Storescp:
    """storescp with the given options (e.g. ``--sleep-during 30``, ``+xt``) on a free port, once it listens."""
    binary = require("storescp", "dcmtk")
    port = free_port()
    folder.mkdir(parents=True)
    process = subprocess.Popen(
        [binary, "-aet", ae_title, *options, "-od", str(folder), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    peer = Storescp(port, folder, process, ae_title)
    try:
        wait_for_port(port, process, timeout=10, what="storescp")
    except BaseException:
        peer.stop()
        raise
    return peer
