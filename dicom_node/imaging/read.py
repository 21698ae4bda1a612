"""Decode a mammogram: DICOM in, the stored pixel values and acquisition parameters out.

Pixels are the *stored* values, bit-exact, never rescaled or inverted. Restoration is only
meaningful on linear raw data (For Processing, MONOCHROME2, value rising with dose); For
Presentation images are read too (MONOCHROME1 included, left as stored) and flagged by
``AcquisitionParams.for_processing = False`` so that callers can decide.
"""

import io
import warnings
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from dicom_node.errors import InputRefused

MG_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"
MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"

LOSSLESS_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLossless,
    JPEGLosslessSV1,
    RLELossless,
)

# Syntaxes that may carry irreversibly compressed pixels; named as such in the refusal.
_LOSSY_TRANSFER_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.81",
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.4.203",
        "1.2.840.10008.1.2.4.100",
        "1.2.840.10008.1.2.4.101",
        "1.2.840.10008.1.2.4.102",
        "1.2.840.10008.1.2.4.103",
        "1.2.840.10008.1.2.4.104",
        "1.2.840.10008.1.2.4.105",
        "1.2.840.10008.1.2.4.106",
    }
)

Source = str | PathLike | bytes | Dataset


@dataclass(frozen=True)
class AcquisitionParams:
    """What the restorer and QA need to know about how the image was made."""

    detector_serial: str | None
    station_name: str | None
    manufacturer: str | None
    model_name: str | None
    kvp: float | None
    exposure_mas: float | None
    body_part_thickness_mm: float | None
    pixel_spacing_mm: tuple[float, float] | None
    bits_stored: int
    for_processing: bool
    laterality: str | None
    view: str | None


@dataclass
class MammoImage:
    """A decoded mammogram; ``dataset`` keeps its pixel data so it can be forwarded or derived from."""

    dataset: Dataset
    pixels: np.ndarray
    params: AcquisitionParams
    transfer_syntax_uid: str


def read_mammogram(source: Source, *, label: str | None = None) -> MammoImage:
    """Read one single-frame 16-bit MG image, refusing anything else with an ``InputRefused``.

    ``label`` names the input in error messages (default: the file name, "<bytes>" or "<dataset>").
    """
    label = label or _label(source)
    ds = _parse(source, label)
    sop_class = UID(str(ds.SOPClassUID))
    if sop_class not in (MG_FOR_PROCESSING, MG_FOR_PRESENTATION):
        raise InputRefused(f"{label} is not a mammogram: SOP Class is {sop_class.name} ({sop_class})")
    if "PixelData" not in ds:
        raise InputRefused(f"{label} has no pixel data")
    syntax = _transfer_syntax(ds, label)
    check_pixel_description(ds, sop_class, label)
    pixels = _decode(ds, label)
    return MammoImage(dataset=ds, pixels=pixels, params=acquisition_params(ds), transfer_syntax_uid=str(syntax))


def acquisition_params(ds: Dataset) -> AcquisitionParams:
    """Acquisition parameters from standard attributes; absent or empty ones become None."""
    exposure_uas = _number(ds, "ExposureInuAs")
    exposure_mas = exposure_uas / 1000 if exposure_uas is not None else _number(ds, "Exposure")
    spacing = ds.get("ImagerPixelSpacing") or ds.get("PixelSpacing")
    return AcquisitionParams(
        detector_serial=_text(ds, "DeviceSerialNumber") or _text(ds, "DetectorID"),
        station_name=_text(ds, "StationName"),
        manufacturer=_text(ds, "Manufacturer"),
        model_name=_text(ds, "ManufacturerModelName"),
        kvp=_number(ds, "KVP"),
        exposure_mas=exposure_mas,
        body_part_thickness_mm=_number(ds, "BodyPartThickness"),
        pixel_spacing_mm=(float(spacing[0]), float(spacing[1])) if spacing and len(spacing) == 2 else None,
        bits_stored=int(ds.BitsStored),
        for_processing=ds.SOPClassUID == MG_FOR_PROCESSING,
        laterality=_text(ds, "ImageLaterality") or _text(ds, "Laterality"),
        view=_text(ds, "ViewPosition"),
    )


def _label(source: Source) -> str:
    if isinstance(source, Dataset):
        return "<dataset>"
    if isinstance(source, bytes):
        return "<bytes>"
    return Path(source).name


def _parse(source: Source, label: str) -> Dataset:
    """Parse strictly: pydicom only warns about a file that ends early, and may return a partial dataset."""
    if isinstance(source, Dataset):
        ds = source
    else:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ds = pydicom.dcmread(io.BytesIO(source) if isinstance(source, bytes) else source)
        except InvalidDicomError as error:
            raise InputRefused(
                f"{label} is not a readable DICOM file: it has no DICOM file header (the 'DICM' prefix is missing)"
            ) from error
        except Exception as error:  # pydicom raises many kinds on damaged input
            raise InputRefused(f"{label} is not a readable DICOM file: {error or type(error).__name__}") from error
        if any("end of file" in str(warning.message).lower() for warning in caught):
            raise InputRefused(f"{label} is not a readable DICOM file: it is truncated")
    if "SOPClassUID" not in ds:
        raise InputRefused(f"{label} is not a readable DICOM file: it has no SOP Class UID (truncated or incomplete)")
    return ds


def _transfer_syntax(ds: Dataset, label: str) -> UID:
    syntax = getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID")
    if syntax is None:
        raise InputRefused(f"{label} has no Transfer Syntax UID in its file meta information")
    syntax = UID(syntax)
    if syntax not in LOSSLESS_TRANSFER_SYNTAXES:
        reason = (
            "which is lossy; this node does not accept it"
            if syntax in _LOSSY_TRANSFER_SYNTAXES
            else "which this node does not accept"
        )
        raise InputRefused(f"{label} uses transfer syntax {syntax.name} ({syntax}), {reason}")
    return syntax


def check_pixel_description(ds: Dataset, sop_class: UID, label: str) -> None:
    """Refuse (InputRefused) pixels this node does not restore; the receiver applies it too, so an
    image that would fail here is refused while the modality still holds it."""
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames != 1:
        raise InputRefused(f"{label} has {frames} frames; this node takes single-frame images")
    if ds.get("BitsAllocated") != 16:
        raise InputRefused(f"{label} has {ds.get('BitsAllocated')} bits allocated; this node takes 16")
    if not 1 <= (ds.get("BitsStored") or 0) <= 16:
        raise InputRefused(f"{label} has Bits Stored {ds.get('BitsStored')}; expected 1 to 16")
    if ds.get("SamplesPerPixel", 1) != 1 or ds.get("PixelRepresentation", 0) != 0:
        raise InputRefused(f"{label} is not single-sample unsigned grayscale")
    photometric = ds.get("PhotometricInterpretation")
    allowed = ("MONOCHROME2",) if sop_class == MG_FOR_PROCESSING else ("MONOCHROME1", "MONOCHROME2")
    if photometric not in allowed:
        kind = "For Processing" if sop_class == MG_FOR_PROCESSING else sop_class.name
        raise InputRefused(f"{label} is {photometric}; {kind} needs {' or '.join(allowed)}")


def _decode(ds: Dataset, label: str) -> np.ndarray:
    try:
        pixels = ds.pixel_array
    except Exception as error:  # decoders raise many kinds on damaged streams
        raise InputRefused(f"{label} has pixel data that cannot be decoded: {error or type(error).__name__}") from error
    if pixels.shape != (ds.Rows, ds.Columns):
        raise InputRefused(f"{label} decodes to shape {pixels.shape}, not Rows×Columns ({ds.Rows}, {ds.Columns})")
    return pixels.astype(np.uint16, copy=False)


def _text(ds: Dataset, keyword: str) -> str | None:
    value = str(ds.get(keyword) or "").strip()
    return value or None


def _number(ds: Dataset, keyword: str) -> float | None:
    value = ds.get(keyword)
    return float(value) if value not in (None, "") else None
