"""The one builder of derived (restored) instances, following docs/dicom.md's recipe.

The derived instance is a copy of the source with new pixels, new deterministic identity and a
record of what was done: reprocessing after a crash yields the same SOP Instance UID, so PACS
receives the same object again instead of a duplicate.
"""

import copy
import hashlib
import os
from datetime import datetime
from io import BytesIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian

from dicom_node import __version__
from dicom_node.files import write_atomically
from dicom_node.imaging.read import MG_FOR_PROCESSING

IMPLEMENTATION_VERSION_NAME = f"DICOMNODE_{__version__}"[:16]

# Attributes that would describe the source's pixels or encoding, not the derived one's, or
# that no longer hold once the pixels change.
_DROPPED = (
    "ReferencedPerformedProcedureStepSequence",
    "IconImageSequence",
    "SmallestImagePixelValue",
    "LargestImagePixelValue",
    "DigitalSignaturesSequence",
    "MACParametersSequence",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
)


def derived_uid(*parts: str) -> str:
    """A ``2.25.<int>`` UID (at most 44 characters) from a SHA-256 of the parts.

    The separator cannot occur in UIDs or profile names, so ("a", "bc") and ("ab", "c") differ.
    """
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


IMPLEMENTATION_CLASS_UID = UID(derived_uid("dicom-node implementation"))


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    """One item of a code sequence."""
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def new_file_meta(ds: Dataset) -> FileMetaDataset:
    """File meta information for writing ``ds`` uncompressed as Explicit VR Little Endian."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta


def build_derived(
    source: Dataset,
    pixels: np.ndarray,
    *,
    method: str,
    profile: str,
    model_name: str | None = None,
    model_digest: str | None = None,
    description: str = "",
    node_version: str,
    station_name: str,
    series_number_offset: int = 1000,
    series_description_suffix: str = " RESTORED",
) -> Dataset:
    """The restored instance of ``source`` carrying ``pixels`` (rounded, clipped to BitsStored).

    Same SOP class, patient and study; new deterministic series and instance; everything that
    describes the low-dose acquisition copied unchanged. Written as Explicit VR Little Endian.
    """
    if pixels.shape != (source.Rows, source.Columns):
        raise ValueError(f"pixels have shape {pixels.shape}, the source is {(source.Rows, source.Columns)}")
    if not np.all(np.isfinite(pixels)):
        raise ValueError("pixels contain NaN or infinity")
    bits_stored = int(source.BitsStored)
    frame = np.clip(np.rint(pixels), 0, (1 << bits_stored) - 1).astype("<u2")
    identity = (profile, method, model_digest or "")  # what makes a different result; not time, not host
    now = datetime.now().astimezone()
    model = " ".join(filter(None, [model_name, model_digest])) or "none"

    ds = Dataset()
    for element in source:
        if element.tag.group != 0x7FE0 and element.keyword not in _DROPPED:
            ds.add(copy.deepcopy(element))

    ds.SOPInstanceUID = derived_uid("derived-instance", source.SOPInstanceUID, *identity)
    ds.SeriesInstanceUID = derived_uid("derived-series", source.SeriesInstanceUID, *identity)
    ds.SeriesNumber = int(source.get("SeriesNumber") or 0) + series_number_offset
    ds.SeriesDescription = _with_suffix(str(source.get("SeriesDescription", "")), series_description_suffix)
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S.%f")
    ds.ImageType = ["DERIVED", "PRIMARY", ""]
    ds.DerivationDescription = (
        f"Restored by dicom-node {node_version}: method {method}, profile {profile}, model {model}. {description}"
    ).strip()[:1024]
    ds.DerivationCodeSequence = Sequence([code_item("113087", "DCM", "Smoothing")])
    ds.SourceImageSequence = Sequence([_source_reference(source)])
    ds.ContributingEquipmentSequence = Sequence(
        [
            *ds.get("ContributingEquipmentSequence", []),
            _contribution(method, profile, model, node_version, station_name, now),
        ]
    )

    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.add_new("PixelData", "OW", frame.tobytes())
    _allow_unicode_text(ds, description, method, profile, model, station_name)
    ds.file_meta = new_file_meta(ds)
    return ds


def save_dataset(ds: Dataset, path: str | os.PathLike) -> None:
    """Write ``ds`` as a DICOM file atomically: a reader sees the old file or the whole new one."""
    write_atomically(path, lambda stream: pydicom.dcmwrite(stream, ds, enforce_file_format=True))


def dataset_bytes(ds: Dataset) -> bytes:
    """``ds`` as a DICOM Part 10 file in memory, in the transfer syntax its file meta names."""
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _with_suffix(description: str, suffix: str) -> str:
    """Append the suffix once, keeping the result within LO's 64 characters."""
    base = description.removesuffix(suffix)
    return (base[: 64 - len(suffix)] + suffix).strip()


def _allow_unicode_text(ds: Dataset, *texts: str) -> None:
    """Our texts (e.g. "σe" in a noise description) must not turn into "?": switch to UTF-8 when needed.

    Values are held decoded, so pydicom re-encodes every text element, the source's included, in UTF-8.
    """
    if not all(text.isascii() for text in texts) and ds.get("SpecificCharacterSet") != "ISO_IR 192":
        ds.SpecificCharacterSet = "ISO_IR 192"


def _source_reference(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    purpose = (
        code_item("121358", "DCM", "For Processing predecessor")
        if source.SOPClassUID == MG_FOR_PROCESSING
        else code_item("121322", "DCM", "Source image for image processing operation")
    )
    item.PurposeOfReferenceCodeSequence = Sequence([purpose])
    return item


def _contribution(
    method: str, profile: str, model: str, node_version: str, station_name: str, now: datetime
) -> Dataset:
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = Sequence([code_item("109102", "DCM", "Processing Equipment")])
    item.Manufacturer = "dicom-node"
    item.ManufacturerModelName = "dicom-node restoration"
    item.SoftwareVersions = [f"dicom-node {node_version}", f"model {model}"[:64]]
    item.StationName = station_name[:16]
    item.ContributionDateTime = now.strftime("%Y%m%d%H%M%S.%f%z")
    item.ContributionDescription = f"Low-dose restoration: method {method}, profile {profile}, model {model}"[:1024]
    return item
