"""A valid raw mammogram (Digital Mammography X-Ray Image – For Processing) around a pixel array.

Used by `dicom-node phantom`, the self-test and the tests. The attribute set is the one that makes
``dciodvfy`` report zero errors (docs/dicom.md); only the usual ViewPosition warning remains.
"""

import hashlib

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicom_node import __version__
from dicom_node.imaging.derive import code_item, derived_uid, new_file_meta
from dicom_node.imaging.read import MG_FOR_PROCESSING

SYNTHETIC_DATE = "20240102"
SYNTHETIC_TIME = "093000"

# SNOMED CT codes of the common mammography views (CID 4014).
VIEW_CODES = {
    "CC": ("399162004", "cranio-caudal"),
    "MLO": ("399368009", "medio-lateral oblique"),
    "ML": ("399260004", "medio-lateral"),
    "LM": ("399352003", "latero-medial"),
}


def raw_mammogram_dataset(
    pixels: np.ndarray,
    *,
    seed: int,
    patient_id: str = "PHANTOM",
    patient_name: str = "PHANTOM^SIMULATED",
    detector_serial: str = "SIM-0001",
    station_name: str = "SIMULATOR",
    kvp: float = 29.0,
    exposure_mas: float = 60.0,
    thickness_mm: float = 45.0,
    pixel_spacing_mm: float = 0.07,
    laterality: str = "L",
    view: str = "CC",
    dose_label: str = "",
    bits_stored: int = 14,
    flat_field: bool = False,
) -> Dataset:
    """Wrap a 2-D array of raw detector values into a For Processing MG dataset.

    UIDs are deterministic: the study from patient and seed, the series from the acquisition
    settings, the instance from those plus the pixel content. ``flat_field`` marks a detector
    calibration exposure (no breast): the series is described as such. ``dose_label`` (e.g.
    "50% dose") goes into the series description so dose levels of a phantom study stay apart.
    """
    if pixels.ndim != 2:
        raise ValueError(f"a mammogram is one 2-D frame, got shape {pixels.shape}")
    if not np.issubdtype(pixels.dtype, np.integer):
        raise ValueError(f"raw detector values are integers, got {pixels.dtype}")
    if view not in VIEW_CODES:
        raise ValueError(f"view must be one of {sorted(VIEW_CODES)}, got {view!r}")
    if laterality not in ("L", "R"):
        raise ValueError(f"laterality must be 'L' or 'R', got {laterality!r}")
    if pixels.size and (pixels.min() < 0 or pixels.max() >= 1 << bits_stored):
        raise ValueError(f"pixel values must lie in [0, {(1 << bits_stored) - 1}] for {bits_stored} bits stored")
    frame = np.ascontiguousarray(pixels, dtype="<u2")

    kind = "FLAT FIELD" if flat_field else "RAW"
    settings = [
        kind,
        dose_label,
        f"{kvp:g}",
        f"{exposure_mas:g}",
        f"{thickness_mm:g}",
        f"{pixel_spacing_mm:g}",
        detector_serial,
        station_name,
    ]
    study_uid = derived_uid("synthetic-study", patient_id, str(seed))
    series_uid = derived_uid("synthetic-series", study_uid, *settings)
    instance_uid = derived_uid(
        "synthetic-instance", series_uid, laterality, view, hashlib.sha256(frame.tobytes()).hexdigest()
    )

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = MG_FOR_PROCESSING
    ds.SOPInstanceUID = instance_uid
    ds.InstanceCreationDate = SYNTHETIC_DATE
    ds.InstanceCreationTime = SYNTHETIC_TIME

    # Patient and study
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "F"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = SYNTHETIC_DATE
    ds.StudyTime = SYNTHETIC_TIME
    ds.ReferringPhysicianName = ""
    ds.StudyID = f"SIM{seed % 10**13}"
    ds.AccessionNumber = ""
    ds.StudyDescription = "SIMULATED MAMMOGRAPHY"

    # Series (DX/MG series) and equipment
    ds.Modality = "MG"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.SeriesDescription = " ".join(filter(None, [kind, dose_label]))
    ds.PresentationIntentType = "FOR PROCESSING"
    ds.Manufacturer = "SIMULATED"
    ds.ManufacturerModelName = "DICOM-NODE PHANTOM"
    ds.DeviceSerialNumber = detector_serial
    ds.StationName = station_name
    ds.SoftwareVersions = f"dicom-node {__version__}"

    # General image, DX image, mammography image
    ds.InstanceNumber = 1
    ds.ContentDate = SYNTHETIC_DATE
    ds.ContentTime = SYNTHETIC_TIME
    ds.AcquisitionDate = SYNTHETIC_DATE
    ds.AcquisitionTime = SYNTHETIC_TIME
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.PatientOrientation = ["P", "L"] if laterality == "R" else ["A", "R"]
    ds.ImageLaterality = laterality
    ds.ViewPosition = view
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.OrganExposed = "BREAST"
    ds.AnatomicRegionSequence = Sequence([code_item("76752008", "SCT", "Breast")])
    view_code, view_meaning = VIEW_CODES[view]
    view_item = code_item(view_code, "SCT", view_meaning)
    view_item.ViewModifierCodeSequence = Sequence()
    ds.ViewCodeSequence = Sequence([view_item])
    ds.AcquisitionContextSequence = Sequence()
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    if flat_field:
        ds.ImageComments = "Flat-field exposure (no breast)"

    # Acquisition and detector
    ds.KVP = kvp
    ds.Exposure = round(exposure_mas)
    ds.ExposureInuAs = round(exposure_mas * 1000)
    ds.BodyPartThickness = thickness_mm
    ds.DetectorType = "DIRECT"
    ds.DetectorID = detector_serial
    ds.ImagerPixelSpacing = [pixel_spacing_mm, pixel_spacing_mm]

    # Image pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = frame.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = frame.tobytes()

    ds.file_meta = new_file_meta(ds)
    return ds
