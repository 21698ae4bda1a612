"""Received files on disk before the modality hears Success: whole, fsynced, never half-written.

Layout under the spool root: ``incoming/`` holds files being written (anything left there after a
crash was never acknowledged and is removed at start); ``<study>/<sop>-<sha256[:12]>.dcm`` holds
each received file. A file appears under its final name only complete and on stable storage.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger("dicom_node.receive")


def _fsync_directory(path: Path) -> None:
    """Make a rename or unlink inside `path` survive a power cut."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


class Spool:
    def __init__(self, root: Path):
        self.root = root
        self.incoming = root / "incoming"

    def prepare(self) -> int:
        """Create the folders and remove files a crash left half-written; returns how many."""
        self.incoming.mkdir(parents=True, exist_ok=True)
        leftovers = [p for p in self.incoming.iterdir() if p.is_file()]
        for path in leftovers:
            path.unlink()
            log.warning("removed %s: an unacknowledged partial write from before a restart", path.name)
        if leftovers:
            _fsync_directory(self.incoming)
        return len(leftovers)

    def store(self, data: bytes, study_uid: str, sop_instance_uid: str, sha256: str) -> Path:
        """Write `data` durably as ``<study>/<sop>-<sha[:12]>.dcm`` and return its path.

        The name is claimed with a hard link, which never replaces an existing file: a second copy
        of the same bytes (duplicate policy reprocess-all) gets ``-2``, ``-3``… so that deleting
        one job's input never removes another's. UIDs must already be checked as path-safe.
        """
        handle, temp_name = tempfile.mkstemp(dir=self.incoming, suffix=".part")
        temp = Path(temp_name)
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            study_dir = self.root / study_uid
            if not study_dir.is_dir():
                study_dir.mkdir(exist_ok=True)
                _fsync_directory(self.root)
            stem = f"{sop_instance_uid}-{sha256[:12]}"
            target, copy = study_dir / f"{stem}.dcm", 1
            while True:
                try:
                    os.link(temp, target)
                    break
                except FileExistsError:
                    copy += 1
                    target = study_dir / f"{stem}-{copy}.dcm"
            _fsync_directory(study_dir)
        finally:
            temp.unlink(missing_ok=True)
        return target

    def discard(self, path: Path) -> None:
        """Remove a spooled file whose job could not be recorded (never acknowledged)."""
        path.unlink(missing_ok=True)
        _fsync_directory(path.parent)
