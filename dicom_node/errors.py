"""What can go wrong, sorted by what a person or the worker should do about it.

Every failure the project raises on purpose is a `NodeError`, whose text is one line for a
person. Its class says what happens next:

- `InputRefused`: this input (an image, a file, a request) cannot be taken. Permanent: the same
  input fails the same way, so the worker fails the job at once; the text says why, for IT.
- `ConfigurationError`: the configuration or the environment is wrong (a missing detector
  entry, an unknown model, an unwritable folder). Permanent until a person fixes the setup; the
  commands print it as one line.
- `Unavailable`: a peer or a resource is not there now (PACS down, disk full, job log locked).
  Transient: try again later.

Anything else is an internal error (a bug, or a library failing in a way nobody foresaw): it is
logged with its traceback, the worker retries it a bounded number of times and then fails the
job as "internal error", and the commands print one line (the traceback with DICOM_NODE_DEBUG=1).
A numpy `ValueError` is therefore never mistaken for a bad image.
"""

from __future__ import annotations


class NodeError(Exception):
    """A failure foreseen by the code; ``str(error)`` is one line for a person."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class InputRefused(NodeError):
    """This input cannot be processed as asked; trying again fails the same way."""


class ConfigurationError(NodeError):
    """The configuration or the environment is wrong; a person must fix it."""


class Unavailable(NodeError):
    """A peer or a resource is unavailable for now; trying again later may succeed."""
