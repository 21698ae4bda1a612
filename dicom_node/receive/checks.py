"""Receive-time checks of a dataset's pixels, from its header and the Pixel Data's bytes, never decoded.

The modality must hear 0xC000 while it still holds the image, not Success followed by a failed
job: an image whose pixel description is missing or absurd, or whose Pixel Data cannot hold the
pixels it describes, is refused here. Each function returns the problem in one line (it becomes
the C-STORE Error Comment, so it is ASCII and leads with the figures) or None.
"""

from __future__ import annotations

import struct
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.encaps import parse_basic_offsets, parse_fragments
from pydicom.uid import UID

from dicom_node.errors import InputRefused
from dicom_node.imaging.read import check_pixel_description

PHOTOMETRIC_INTERPRETATIONS = ("MONOCHROME1", "MONOCHROME2")
BITS_ALLOCATED = (8, 16)

# Type 1 attributes of the Image Pixel module that describe the pixels (PS3.3 C.7.6.3).
_REQUIRED = (
    "PixelData",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "PhotometricInterpretation",
)


def image_problem(ds: Dataset, transfer_syntax: str) -> str | None:
    """What makes the received image unreadable or unrestorable, or None: its pixel description,
    what the worker takes (`restorable_problem`), then its Pixel Data."""
    return pixel_description_problem(ds) or restorable_problem(ds) or pixel_data_problem(ds, transfer_syntax)


def restorable_problem(ds: Dataset) -> str | None:
    """Pixels the worker would refuse (16 bits, unsigned, one frame, MONOCHROME2 for For Processing):
    the worker's own check (`imaging.read.check_pixel_description`), so the two never drift apart."""
    try:
        check_pixel_description(ds, UID(str(ds.get("SOPClassUID", ""))), "image")
    except InputRefused as refused:
        return str(refused)
    return None


def pixel_description_problem(ds: Dataset) -> str | None:
    """A missing or absurd Image Pixel attribute: grayscale, one sample, 8 or 16 bits allocated."""
    missing = [keyword for keyword in _REQUIRED if ds.get(keyword) in (None, "")]
    if missing:
        return f"dataset lacks {', '.join(missing)}"
    rows, columns = _integer(ds, "Rows"), _integer(ds, "Columns")
    if rows is None or columns is None or rows < 1 or columns < 1:
        return f"Rows {ds.Rows} x Columns {ds.Columns}: both must be above 0"
    allocated, stored = _integer(ds, "BitsAllocated"), _integer(ds, "BitsStored")
    if allocated not in BITS_ALLOCATED:
        return f"Bits Allocated {ds.BitsAllocated}, not {' or '.join(map(str, BITS_ALLOCATED))}"
    if stored is None or not 1 <= stored <= allocated:
        return f"Bits Stored {ds.BitsStored}, not 1 to Bits Allocated {allocated}"
    if _integer(ds, "PixelRepresentation") not in (0, 1):
        return f"Pixel Representation {ds.PixelRepresentation}, not 0 or 1"
    samples = _integer(ds, "SamplesPerPixel", 1)
    if samples != 1:
        return f"Samples per Pixel {ds.SamplesPerPixel}, not 1: not a grayscale image"
    photometric = str(ds.PhotometricInterpretation).strip()
    if photometric not in PHOTOMETRIC_INTERPRETATIONS:
        return f"Photometric Interpretation {photometric}, not {' or '.join(PHOTOMETRIC_INTERPRETATIONS)}"
    frames = _integer(ds, "NumberOfFrames", 1)
    if frames is None or frames < 1:
        return f"Number of Frames {ds.NumberOfFrames}, not 1 or more"
    return None


def pixel_data_problem(ds: Dataset, transfer_syntax: str) -> str | None:
    """Pixel Data that cannot hold the described pixels; call after `pixel_description_problem` found none.

    Native: its length must be Rows x Columns x Samples x Bits Allocated / 8 x Frames, plus the one
    padding byte an odd length gets. Encapsulated: its item structure must parse and hold at least
    one fragment (read, not decompressed).
    """
    value = ds.PixelData
    if UID(transfer_syntax).is_encapsulated:
        return _fragments_problem(value)
    rows, columns, bits = int(ds.Rows), int(ds.Columns), int(ds.BitsAllocated)
    samples, frames = int(ds.get("SamplesPerPixel") or 1), int(ds.get("NumberOfFrames") or 1)
    needed = rows * columns * samples * bits // 8 * frames
    if len(value) == needed or (needed % 2 and len(value) == needed + 1):
        return None
    return f"Pixel Data is {len(value)} bytes, not {needed} ({rows}x{columns}x{samples}x{bits} bits" + (
        f" x {frames} frames)" if frames > 1 else ")"
    )


def _fragments_problem(value: bytes) -> str | None:
    """Every encapsulated transfer syntax is little endian: the Basic Offset Table item, then fragments."""
    buffer = BytesIO(value)
    try:
        parse_basic_offsets(buffer)  # leaves `buffer` at the first fragment's item
        fragments, _ = parse_fragments(buffer)
    except (ValueError, struct.error) as exc:
        return f"encapsulated Pixel Data is malformed: {exc}"
    return None if fragments else "encapsulated Pixel Data holds no fragment"


def _integer(ds: Dataset, keyword: str, default: int | None = None) -> int | None:
    """A single integer value (US, SS, IS), the default when absent, None when it is anything else."""
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    return int(value) if isinstance(value, int) else None
