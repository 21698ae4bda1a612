"""Real DICOM peers for integration tests: Orthanc as the PACS, DCMTK storescu as the modality.

Each peer runs on free loopback ports in a temporary folder and is stopped by its fixture. A
missing Debian package fails the test and names the package (never a skip).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

GDCM_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancGdcm.so")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require(binary: str, package: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"{binary} is not installed; apt-get install -y --no-install-recommends {package}", pytrace=False)
    return path


class Orthanc:
    """A throwaway Orthanc on loopback: DICOM port, REST API, storage under `folder`."""

    def __init__(self, folder: Path, aet: str = "ORTHANC", modalities: dict | None = None):
        self.folder = folder
        self.aet = aet
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.modalities = modalities or {}
        self.process: subprocess.Popen | None = None

    def start(self) -> "Orthanc":
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
        log = open(self.folder / "orthanc.log", "w")
        self.process = subprocess.Popen([binary, str(self.folder / "orthanc.json")], stdout=log, stderr=log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                self.get("/system")
                return self
            except OSError:
                if self.process.poll() is not None:
                    break
                time.sleep(0.1)
        self.stop()
        pytest.fail(f"Orthanc did not start: {(self.folder / 'orthanc.log').read_text()[-2000:]}")

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
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.find(sop_instance_uid)
            if found:
                return found
            time.sleep(0.2)
        pytest.fail(f"Orthanc never received {sop_instance_uid}")

    def tags(self, orthanc_id: str) -> dict:
        return self.get(f"/instances/{orthanc_id}/simplified-tags")

    def file(self, orthanc_id: str) -> bytes:
        return self.request(f"/instances/{orthanc_id}/file")


def storescu(node_port: int, *files: Path, calling: str = "MAMMO1", called: str = "DOSENODE",
             options: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """DCMTK storescu as the modality; returns the completed process (its output names statuses)."""
    binary = require("storescu", "dcmtk")
    return subprocess.run(
        [binary, "-R", "-aet", calling, "-aec", called, *options, "127.0.0.1", str(node_port), *map(str, files)],
        capture_output=True, text=True, timeout=120,
    )
