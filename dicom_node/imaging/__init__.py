"""DICOM ↔ arrays: the only place that decodes DICOM pixels and builds derived instances."""

from dicom_node.imaging.derive import build_derived, dataset_bytes, derived_uid, save_dataset
from dicom_node.imaging.read import (
    LOSSLESS_TRANSFER_SYNTAXES,
    MG_FOR_PRESENTATION,
    MG_FOR_PROCESSING,
    AcquisitionParams,
    MammoImage,
    acquisition_params,
    read_mammogram,
)
from dicom_node.imaging.synthetic import raw_mammogram_dataset

__all__ = [
    "LOSSLESS_TRANSFER_SYNTAXES",
    "MG_FOR_PRESENTATION",
    "MG_FOR_PROCESSING",
    "AcquisitionParams",
    "MammoImage",
    "acquisition_params",
    "build_derived",
    "dataset_bytes",
    "derived_uid",
    "raw_mammogram_dataset",
    "read_mammogram",
    "save_dataset",
]
