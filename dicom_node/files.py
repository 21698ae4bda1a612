"""Writing files so that a reader (or a power cut) sees nothing or the whole file, never a part.

Every file the node or the trainer writes for someone else to read goes through
`write_atomically`: a temporary file in the target's folder, fsync, rename (or hard link, which
never replaces an existing file), then fsync of the folder so that the rename itself is durable.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

# Temporary files are named ".<target name>.<random>.part"; the target's name is cut so that the
# whole stays within the 255 bytes most file systems allow.
_TEMP_SUFFIX = ".part"
_MAX_PREFIX_NAME = 200

DEFAULT_FILE_MODE = 0o640
"""Files the node hands to others (spool, outbox): its owner reads and writes, its group reads, so an
import service in the node's group can take them; `[node] file_mode` changes it."""


def fsync_directory(path: str | os.PathLike) -> None:
    """Make a rename, link or unlink inside `path` survive a power cut."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_atomically(
    target: str | os.PathLike,
    content: bytes | bytearray | memoryview | Callable[[BinaryIO], object],
    *,
    replace: bool = True,
    temp_dir: str | os.PathLike | None = None,
    mode: int | None = None,
) -> Path:
    """Write `content` (bytes, or a function writing to a binary stream) to `target` atomically.

    replace=False claims the name with a hard link instead of a rename: it raises
    FileExistsError rather than replace a file that is already there. `temp_dir` (same file
    system) holds the temporary file instead of the target's folder; `mode` sets the
    permissions (default: those of `tempfile.mkstemp`, owner only). If anything fails, the
    target is as it was and the temporary file is gone.
    """
    target = Path(target)
    folder = Path(temp_dir) if temp_dir is not None else target.parent
    prefix = f".{target.name[:_MAX_PREFIX_NAME]}."
    handle, temp_name = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=_TEMP_SUFFIX)
    temp = Path(temp_name)
    renamed = False
    try:
        with os.fdopen(handle, "wb") as stream:
            if mode is not None:
                os.fchmod(stream.fileno(), mode)
            if isinstance(content, (bytes, bytearray, memoryview)):
                stream.write(content)
            else:
                content(stream)
            stream.flush()
            os.fsync(stream.fileno())
        if replace:
            os.replace(temp, target)
            renamed = True  # the temporary name is gone; never unlink what may be someone else's now
        else:
            os.link(temp, target)
    finally:
        if not renamed:
            temp.unlink(missing_ok=True)
    fsync_directory(target.parent)  # also covers the unlink when the temporary file lay beside it
    return target
