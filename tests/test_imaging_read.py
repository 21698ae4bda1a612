"""Reading mammograms: acquisition parameters, and one clear line for every input the node refuses."""

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_node.errors import InputRefused
from dicom_node.imaging import (
    MG_FOR_PRESENTATION,
    AcquisitionParams,
    dataset_bytes,
    raw_mammogram_dataset,
    read_mammogram,
    save_dataset,
)

from dicomtools import gdcmconv

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def pixels() -> np.ndarray:
    return np.random.default_rng(11).integers(40, 16000, size=(160, 128), dtype=np.uint16)


@pytest.fixture
def raw(pixels: np.ndarray) -> Dataset:
    return raw_mammogram_dataset(
        pixels,
        seed=5,
        detector_serial="DET-42",
        station_name="MAMMO-3",
        kvp=31.0,
        exposure_mas=87.5,
        thickness_mm=52.0,
        pixel_spacing_mm=0.085,
        laterality="R",
        view="MLO",
    )


def _refusal(source: Dataset | bytes | Path, tmp_path: Path) -> str:
    """The InputRefused line for ``source`` written as IN.dcm."""
    path = tmp_path / "IN.dcm"
    if isinstance(source, Dataset):
        save_dataset(source, path)
    elif isinstance(source, bytes):
        path.write_bytes(source)
    else:
        path = source
    with pytest.raises(InputRefused) as refused:
        read_mammogram(path)
    message = str(refused.value)
    print(message)
    assert "\n" not in message and message.startswith(f"{path.name} ")
    return message


def test_acquisition_params_from_a_raw_mammogram(raw: Dataset, pixels: np.ndarray, tmp_path: Path) -> None:
    save_dataset(raw, tmp_path / "raw.dcm")
    image = read_mammogram(tmp_path / "raw.dcm")
    assert np.array_equal(image.pixels, pixels) and image.pixels.dtype == np.uint16
    assert image.params == AcquisitionParams(
        detector_serial="DET-42",
        station_name="MAMMO-3",
        manufacturer="SIMULATED",
        model_name="DICOM-NODE PHANTOM",
        kvp=31.0,
        exposure_mas=87.5,
        body_part_thickness_mm=52.0,
        pixel_spacing_mm=(0.085, 0.085),
        bits_stored=14,
        for_processing=True,
        laterality="R",
        view="MLO",
    )
    assert image.transfer_syntax_uid == pydicom.uid.ExplicitVRLittleEndian
    assert "PixelData" in image.dataset


def test_acquisition_params_fall_back_and_tolerate_absence(raw: Dataset) -> None:
    """DetectorID, Exposure (whole mAs) and PixelSpacing stand in when the preferred attributes are missing."""
    del raw.DeviceSerialNumber, raw.ExposureInuAs, raw.ImagerPixelSpacing
    raw.PixelSpacing = [0.1, 0.1]
    params = read_mammogram(raw).params
    assert (params.detector_serial, params.exposure_mas, params.pixel_spacing_mm) == ("DET-42", 88.0, (0.1, 0.1))

    del raw.DetectorID, raw.Exposure, raw.PixelSpacing, raw.KVP, raw.BodyPartThickness, raw.ViewPosition
    raw.StationName = ""
    params = read_mammogram(raw).params
    assert params.detector_serial is params.exposure_mas is params.pixel_spacing_mm is None
    assert params.kvp is params.body_part_thickness_mm is params.view is params.station_name is None


def test_reads_bytes_and_datasets_alike(raw: Dataset, pixels: np.ndarray) -> None:
    from_bytes = read_mammogram(dataset_bytes(raw))
    from_dataset = read_mammogram(raw)
    assert np.array_equal(from_bytes.pixels, pixels) and np.array_equal(from_dataset.pixels, pixels)
    assert from_bytes.params == from_dataset.params


def test_for_presentation_monochrome1_is_read_as_stored(raw: Dataset, pixels: np.ndarray) -> None:
    raw.SOPClassUID = MG_FOR_PRESENTATION
    raw.PresentationIntentType = "FOR PRESENTATION"
    raw.PhotometricInterpretation = "MONOCHROME1"
    image = read_mammogram(dataset_bytes(raw))
    assert not image.params.for_processing
    assert np.array_equal(image.pixels, pixels)


def _ct_image(raw: Dataset, pixels: np.ndarray, tmp_path: Path) -> Dataset:
    raw.SOPClassUID = CT_IMAGE_STORAGE
    raw.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    return raw


def _no_pixel_data(raw: Dataset, pixels: np.ndarray, tmp_path: Path) -> Dataset:
    del raw.PixelData
    return raw


def _text_file(raw: Dataset, pixels: np.ndarray, tmp_path: Path) -> bytes:
    return b"PatientName=Doe\nthis is a note, not an image\n" * 20


def _short_pixel_data(raw: Dataset, pixels: np.ndarray, tmp_path: Path) -> bytes:
    data = dataset_bytes(raw)
    return data[: len(data) - 1000]


def _j2k(raw: Dataset, tmp_path: Path) -> bytes:
    save_dataset(raw, tmp_path / "raw.dcm")
    return gdcmconv(tmp_path / "raw.dcm", tmp_path / "j2k.dcm", "--j2k").read_bytes()


def _truncated_j2k(raw: Dataset, pixels: np.ndarray, tmp_path: Path) -> bytes:
    data = _j2k(raw, tmp_path)
    return data[: len(data) // 2]


def _corrupt_j2k_codestream(raw: Dataset, pixels: np.ndarray, tmp_path: Path) -> bytes:
    data = _j2k(raw, tmp_path)
    start = data.find(bytes.fromhex("ff4fff51"))  # JPEG 2000 start-of-codestream + SIZ markers
    assert start > 0
    return data[:start] + bytes(16) + data[start + 16 :]


def _two_frames(raw: Dataset, pixels: np.ndarray, tmp_path: Path) -> Dataset:
    raw.NumberOfFrames = 2
    raw.PixelData = np.stack([pixels, pixels]).tobytes()
    return raw


def _eight_bit(raw: Dataset, pixels: np.ndarray, tmp_path: Path) -> Dataset:
    raw.BitsAllocated, raw.BitsStored, raw.HighBit = 8, 8, 7
    raw.PixelData = (pixels >> 6).astype(np.uint8).tobytes()
    raw["PixelData"].VR = "OB"
    return raw


def _monochrome1_raw(raw: Dataset, pixels: np.ndarray, tmp_path: Path) -> Dataset:
    """Raw data must rise with dose; a MONOCHROME1 For Processing image is not what restoration models."""
    raw.PhotometricInterpretation = "MONOCHROME1"
    return raw


# (how the refused input is made, what the refusal says, whether that is the whole line or a part of it)
REFUSALS = [
    pytest.param(
        _ct_image, f"IN.dcm is not a mammogram: SOP Class is CT Image Storage ({CT_IMAGE_STORAGE})", True, id="ct-image"
    ),
    pytest.param(_no_pixel_data, "IN.dcm has no pixel data", True, id="no-pixel-data"),
    pytest.param(_text_file, "IN.dcm is not a readable DICOM file: ", False, id="text-file"),
    pytest.param(_short_pixel_data, "has pixel data that cannot be decoded", False, id="short-pixel-data"),
    pytest.param(_truncated_j2k, "truncated", False, id="truncated-jpeg-2000-file"),
    pytest.param(
        _corrupt_j2k_codestream, "has pixel data that cannot be decoded", False, id="corrupt-jpeg-2000-codestream"
    ),
    pytest.param(_two_frames, "has 2 frames; this node takes single-frame", False, id="multi-frame"),
    pytest.param(_eight_bit, "8 bits allocated", False, id="8-bit-pixels"),
    pytest.param(_monochrome1_raw, "is MONOCHROME1; For Processing needs MONOCHROME2", False, id="inverted-raw-image"),
]


@pytest.mark.parametrize(("make", "expected", "whole_line"), REFUSALS)
def test_refused_input_gets_one_clear_line(
    make, expected: str, whole_line: bool, raw: Dataset, pixels: np.ndarray, tmp_path: Path
) -> None:
    message = _refusal(make(raw, pixels, tmp_path), tmp_path)
    if whole_line:
        assert message == expected
    else:
        assert expected in message


def test_every_truncation_gives_an_imaging_error(raw: Dataset) -> None:
    """Whatever point a transfer breaks off at, the reader refuses with InputRefused, never another exception."""
    data = dataset_bytes(raw)
    kinds = set()
    for length in range(0, len(data) - 1, 97):
        with pytest.raises(InputRefused) as refused:
            read_mammogram(data[:length])
        kinds.add(str(refused.value).split(":")[0])
    print(f"{len(range(0, len(data) - 1, 97))} truncations, refusal kinds: {sorted(kinds)}")
