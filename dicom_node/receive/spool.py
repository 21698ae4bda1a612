"""Received files on disk before the modality hears Success: whole, fsynced, never half-written.

Layout under the spool root: ``incoming/`` holds files being written (anything left there after a
crash was never acknowledged and is removed at start); ``<study>/<sop>-<sha256[:12]>.dcm`` holds
each received file. A file appears under its final name only complete and on stable storage, with
the mode `[node] file_mode` gives (owner read/write, group read by default).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from pathlib import Path

from dicom_node.files import DEFAULT_FILE_MODE, fsync_directory, write_atomically

log = logging.getLogger("dicom_node.receive")


class Spool:
    def __init__(self, root: Path, file_mode: int = DEFAULT_FILE_MODE):
        self.root = root
        self.incoming = root / "incoming"
        self.file_mode = file_mode

    def prepare(self) -> int:
        """Create the folders and remove files a crash left half-written; returns how many."""
        self.incoming.mkdir(parents=True, exist_ok=True)
        leftovers = [p for p in self.incoming.iterdir() if p.is_file()]
        for path in leftovers:
            path.unlink()
            log.warning("removed %s: an unacknowledged partial write from before a restart", path.name)
        if leftovers:
            fsync_directory(self.incoming)
        return len(leftovers)

    def store(self, data: bytes, study_uid: str, sop_instance_uid: str, sha256: str) -> Path:
        """Write `data` durably as ``<study>/<sop>-<sha[:12]>.dcm`` and return its path.

        The name is claimed with a hard link, which never replaces an existing file: a second copy
        of the same bytes (duplicate policy reprocess-all) gets ``-2``, ``-3``… so that deleting
        one job's input never removes another's. UIDs must already be checked as path-safe.
        """
        study_dir = self.root / study_uid
        if not study_dir.is_dir():
            study_dir.mkdir(exist_ok=True)
            fsync_directory(self.root)
        for target in _candidate_names(study_dir, f"{sop_instance_uid}-{sha256[:12]}"):
            if target.exists():  # skip taken names without writing the data again for each
                continue
            try:
                return write_atomically(target, data, replace=False, temp_dir=self.incoming, mode=self.file_mode)
            except FileExistsError:  # another association claimed it between the check and the link
                continue
        raise AssertionError("unreachable: the candidate names never end")

    def discard(self, path: Path) -> None:
        """Remove a spooled file whose job could not be recorded (never acknowledged)."""
        path.unlink(missing_ok=True)
        fsync_directory(path.parent)


def _candidate_names(folder: Path, stem: str) -> Iterator[Path]:
    """``<stem>.dcm``, then ``<stem>-2.dcm``, ``<stem>-3.dcm``…"""
    yield folder / f"{stem}.dcm"
    for copy in itertools.count(2):
        yield folder / f"{stem}-{copy}.dcm"
