"""Where derived images go: a DICOM peer (PACS) or a folder, behind one small interface.

The forwarder only calls ``send`` and reads the `SendResult`; whether a failure is worth a retry is
decided here, next to the knowledge of what went wrong.
"""

from __future__ import annotations

import errno
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from dicom_node.config import Config
from dicom_node.config import Destination as DestinationEntry
from dicom_node.errors import ConfigurationError
from dicom_node.files import DEFAULT_FILE_MODE, write_atomically
from dicom_node.forward import scu
from dicom_node.forward.scu import SendResult

DUPLICATE_SOP_INSTANCE = 0x0111

# Errors that no retry fixes: something in the way that is not a folder.
_NOT_A_FOLDER = {errno.ENOTDIR, errno.EEXIST}


class Destination(Protocol):
    """What the forwarder needs of any destination."""

    @property
    def name(self) -> str:
        """The destination's name in the configuration."""
        ...

    def send(self, path: Path) -> SendResult:
        """Deliver one DICOM file."""
        ...

    def echo(self) -> SendResult:
        """Check that the destination is there and would take a file."""
        ...

    def describe(self) -> str:
        """One line naming the destination for logs and commands."""
        ...


@dataclass(frozen=True)
class NetworkDestination:
    """A DICOM Storage SCP, reached with C-STORE from ``calling_ae``."""

    name: str
    ae_title: str
    host: str
    port: int
    calling_ae: str
    timeout_s: float
    duplicate_is_delivered: bool = False  # 0x0111 (PACS has this instance already) counts as sent
    commitment_timeout_s: float | None = None  # set: each store is followed by a storage commitment request

    def send(self, path: Path, commitment_uid: str | None = None) -> SendResult:
        result = scu.send_file(
            path,
            ae_title=self.ae_title,
            host=self.host,
            port=self.port,
            calling_ae=self.calling_ae,
            timeout_s=self.timeout_s,
            commitment_uid=commitment_uid,
        )
        if result.status == DUPLICATE_SOP_INSTANCE and self.duplicate_is_delivered:
            return replace(result, ok=True, message=f"{self.ae_title}@{self.host}:{self.port}: has it already (0x0111)")
        return result

    def echo(self) -> SendResult:
        return scu.echo(
            ae_title=self.ae_title, host=self.host, port=self.port, calling_ae=self.calling_ae, timeout_s=self.timeout_s
        )

    def describe(self) -> str:
        return f"{self.name} (DICOM {self.ae_title}@{self.host}:{self.port})"


@dataclass(frozen=True)
class FolderDestination:
    """A directory that receives each file as ``<SOPInstanceUID>.dcm``, written atomically with mode
    `file_mode` (`[node] file_mode`: an import service in the node's group reads the outbox)."""

    name: str
    folder: Path
    file_mode: int = DEFAULT_FILE_MODE

    def send(self, path: Path) -> SendResult:
        started = time.monotonic()
        return replace(self._deliver(Path(path)), seconds=time.monotonic() - started)

    def echo(self) -> SendResult:
        """Create the folder if needed and prove it writable with a probe file."""
        started = time.monotonic()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.folder):
                pass
        except OSError as exc:
            result = self._failure(exc)
        else:
            result = SendResult(True, False, None, f"{self.folder}: writable", 0.0)
        return replace(result, seconds=time.monotonic() - started)

    def describe(self) -> str:
        return f"{self.name} (folder {self.folder})"

    def _deliver(self, source: Path) -> SendResult:
        """Copied with `write_atomically`: a reader sees nothing or the whole file."""
        try:
            uid = UID(dcmread(source, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
        except (OSError, InvalidDicomError, AttributeError) as exc:
            return SendResult(False, False, None, f"{self.folder}: cannot read {source}: {exc}", 0.0)
        if not uid.is_valid:  # it becomes the file name: digits and dots only
            return SendResult(False, False, None, f"{self.folder}: {source} has an invalid SOP Instance UID", 0.0)
        target = self.folder / f"{uid}.dcm"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(source, "rb") as original:
                write_atomically(target, lambda copy: shutil.copyfileobj(original, copy), mode=self.file_mode)
        except OSError as exc:
            return self._failure(exc)
        return SendResult(True, False, None, f"{self.folder}: wrote {target.name}", 0.0)

    def _failure(self, exc: OSError) -> SendResult:
        """Not a directory: permanent. Anything else (disk full, permissions) can be fixed and retried."""
        reason = (exc.strerror or str(exc)).lower()
        if exc.errno in _NOT_A_FOLDER or (self.folder.exists() and not self.folder.is_dir()):
            return SendResult(False, False, None, f"{self.folder}: not a directory ({reason})", 0.0)
        return SendResult(False, True, None, f"{self.folder}: cannot write: {reason}", 0.0)


def make_destination(
    cfg: DestinationEntry, calling_ae: str, *, base_dir: Path | None = None, file_mode: int = DEFAULT_FILE_MODE
) -> Destination:
    """The destination a [[destinations]] entry describes; the node's AE title calls PACS.

    A relative folder is taken relative to ``base_dir`` (the configuration file's folder); its files
    get `file_mode`.
    """
    if cfg.folder is not None:
        folder = cfg.folder if base_dir is None else base_dir / cfg.folder
        return FolderDestination(cfg.name, folder, file_mode)
    if cfg.ae_title is None or cfg.host is None or cfg.port is None:  # DestinationEntry validates this
        raise ConfigurationError(f"destination {cfg.name!r} needs ae_title, host and port (or a folder)")
    return NetworkDestination(
        cfg.name,
        cfg.ae_title,
        cfg.host,
        cfg.port,
        calling_ae,
        cfg.timeout_s,
        cfg.duplicate_is_delivered,
        cfg.commitment_timeout_s if cfg.storage_commitment else None,
    )


def destination_named(config: Config, name: str) -> Destination:
    """The configured destination called `name`; ConfigurationError listing the known ones otherwise."""
    for entry in config.destinations:
        if entry.name == name:
            return make_destination(
                entry, config.node.ae_title, base_dir=config.base_dir, file_mode=config.node.file_mode
            )
    known = ", ".join(d.name for d in config.destinations) or "none"
    raise ConfigurationError(f"no destination named {name!r} (configured: {known})")
