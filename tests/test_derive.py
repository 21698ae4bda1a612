"""The derived (restored) instance follows docs/dicom.md's recipe and passes dciodvfy."""

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian

from dicom_node.imaging import (
    MG_FOR_PRESENTATION,
    MG_FOR_PROCESSING,
    build_derived,
    dataset_bytes,
    derived_uid,
    raw_mammogram_dataset,
    read_mammogram,
    save_dataset,
)

from dicomtools import dciodvfy_errors, dcmtk_convert, gdcmconv, transfer_syntax_of

MAX_14_BIT = (1 << 14) - 1
RECIPE = dict(
    method="gat-bm3d",
    profile="standard",
    model_name="unet-ld25",
    model_digest="sha256:9f2c41d0e5",
    node_version="0.1.0",
    station_name="RESTORE-1",
)

# Attributes describing the low-dose acquisition, its equipment and its geometry: QA needs them unchanged.
COPIED_UNCHANGED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "Modality",
    "Manufacturer",
    "ManufacturerModelName",
    "DeviceSerialNumber",
    "StationName",
    "SoftwareVersions",
    "InstanceNumber",
    "ImageLaterality",
    "ViewPosition",
    "ViewCodeSequence",
    "PatientOrientation",
    "PositionerType",
    "DetectorType",
    "DetectorID",
    "ImagerPixelSpacing",
    "KVP",
    "Exposure",
    "ExposureInuAs",
    "BodyPartThickness",
    "CompressionForce",
    "AnodeTargetMaterial",
    "FilterMaterial",
    "EntranceDoseInmGy",
    "OrganDose",
    "LossyImageCompression",
    "BurnedInAnnotation",
    "PresentationIntentType",
    "PhotometricInterpretation",
    "BitsStored",
    "Rows",
    "Columns",
)


def _code(item: Dataset) -> tuple[str, str, str]:
    return item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning


@pytest.fixture
def pixels() -> np.ndarray:
    return np.random.default_rng(23).integers(50, 12000, size=(192, 160), dtype=np.uint16)


@pytest.fixture
def raw(pixels: np.ndarray) -> Dataset:
    """A For Processing source as a modality sends it, with dose attributes and a performed procedure step."""
    ds = raw_mammogram_dataset(pixels, seed=9, view="MLO", laterality="R", dose_label="25% dose")
    ds.CompressionForce = 95.0
    ds.AnodeTargetMaterial = "TUNGSTEN"
    ds.FilterMaterial = "RHODIUM"
    ds.EntranceDoseInmGy = 3.1
    ds.OrganDose = 0.42
    step = Dataset()
    step.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.3"
    step.ReferencedSOPInstanceUID = derived_uid("performed procedure step", "9")
    ds.ReferencedPerformedProcedureStepSequence = Sequence([step])
    return ds


@pytest.fixture
def presentation(raw: Dataset) -> Dataset:
    """A For Presentation source: log-processed, MONOCHROME1, with its VOI window."""
    raw.SOPClassUID = raw.file_meta.MediaStorageSOPClassUID = MG_FOR_PRESENTATION
    raw.PresentationIntentType = "FOR PRESENTATION"
    raw.PhotometricInterpretation = "MONOCHROME1"
    raw.PresentationLUTShape = "INVERSE"
    raw.PixelIntensityRelationship = "LOG"
    raw.PixelIntensityRelationshipSign = -1
    raw.WindowCenter, raw.WindowWidth = 6000, 12000
    raw.SeriesDescription = "L CC"
    return raw


def test_recipe_attributes(raw: Dataset, pixels: np.ndarray) -> None:
    earlier = Dataset()
    earlier.Manufacturer = "SIMULATED"
    raw.ContributingEquipmentSequence = Sequence([earlier])
    derived = build_derived(raw, pixels + 1.2, description="25% dose restored to full dose", **RECIPE)

    assert derived.SOPClassUID == raw.SOPClassUID == MG_FOR_PROCESSING
    for uid in (derived.SOPInstanceUID, derived.SeriesInstanceUID):
        assert UID(uid).is_valid and uid.startswith("2.25.") and len(uid) <= 64
    assert derived.SOPInstanceUID != raw.SOPInstanceUID
    assert derived.SeriesInstanceUID != raw.SeriesInstanceUID
    for keyword in COPIED_UNCHANGED:
        assert derived.get(keyword) == raw.get(keyword) is not None, keyword

    assert derived.SeriesNumber == raw.SeriesNumber + 1000
    assert derived.SeriesDescription == "RAW 25% dose RESTORED"
    assert list(derived.ImageType) == ["DERIVED", "PRIMARY", ""]
    for part in ("gat-bm3d", "standard", "unet-ld25", "sha256:9f2c41d0e5", "25% dose restored"):
        assert part in derived.DerivationDescription
    assert [_code(item) for item in derived.DerivationCodeSequence] == [("113087", "DCM", "Smoothing")]

    (source,) = derived.SourceImageSequence
    assert (source.ReferencedSOPClassUID, source.ReferencedSOPInstanceUID) == (raw.SOPClassUID, raw.SOPInstanceUID)
    assert [_code(c) for c in source.PurposeOfReferenceCodeSequence] == [
        ("121358", "DCM", "For Processing predecessor")
    ]

    kept, ours = derived.ContributingEquipmentSequence
    assert kept.Manufacturer == "SIMULATED"
    assert [_code(c) for c in ours.PurposeOfReferenceCodeSequence] == [("109102", "DCM", "Processing Equipment")]
    assert ours.Manufacturer and ours.ManufacturerModelName
    assert ours.StationName == "RESTORE-1"
    assert "0.1.0" in " ".join(ours.SoftwareVersions) and "sha256:9f2c41d0e5" in " ".join(ours.SoftwareVersions)
    assert len(ours.ContributionDateTime) >= 14 and "gat-bm3d" in ours.ContributionDescription

    assert "ReferencedPerformedProcedureStepSequence" not in derived
    assert derived.InstanceCreationDate != raw.InstanceCreationDate
    assert derived.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert derived.file_meta.MediaStorageSOPInstanceUID == derived.SOPInstanceUID
    assert derived.file_meta.MediaStorageSOPClassUID == derived.SOPClassUID
    assert raw.ContributingEquipmentSequence == Sequence([earlier]), "the source must be left as it was"


def test_for_presentation_source_is_referenced_as_image_processing_source(
    presentation: Dataset, pixels: np.ndarray
) -> None:
    derived = build_derived(presentation, pixels, **RECIPE)
    assert derived.SOPClassUID == MG_FOR_PRESENTATION
    assert derived.PhotometricInterpretation == "MONOCHROME1"
    assert (derived.WindowCenter, derived.WindowWidth) == (6000, 12000)
    (source,) = derived.SourceImageSequence
    assert [_code(c) for c in source.PurposeOfReferenceCodeSequence] == [
        ("121322", "DCM", "Source image for image processing operation")
    ]


def test_uids_are_deterministic_and_follow_profile_and_model(raw: Dataset, pixels: np.ndarray) -> None:
    def uids(source: Dataset = raw, **changes: str) -> tuple[str, str]:
        derived = build_derived(source, pixels, **{**RECIPE, **changes})
        return derived.SOPInstanceUID, derived.SeriesInstanceUID

    first = uids()
    assert uids() == first, "reprocessing must give the same object"
    assert uids(station_name="OTHER", node_version="9.9") == first
    for change in ({"profile": "gentle"}, {"model_digest": "sha256:0000000000"}):
        other = uids(**change)
        assert other[0] != first[0] and other[1] != first[1], change

    sibling = raw_mammogram_dataset(pixels[::-1].copy(), seed=9, view="CC", laterality="R", dose_label="25% dose")
    assert sibling.SeriesInstanceUID == raw.SeriesInstanceUID
    sibling_uids = uids(sibling)
    assert sibling_uids[0] != first[0] and sibling_uids[1] == first[1], "one source series, one derived series"


def test_derived_uid() -> None:
    uid = derived_uid("1.2.3", "standard", "sha256:abc")
    assert uid == derived_uid("1.2.3", "standard", "sha256:abc")
    assert UID(uid).is_valid and len(uid) <= 64 and uid.startswith("2.25.")
    assert derived_uid("a", "bc") != derived_uid("ab", "c")
    assert len({derived_uid(str(i)) for i in range(1000)}) == 1000


def test_series_number_and_description_are_stable(raw: Dataset, pixels: np.ndarray) -> None:
    derived = build_derived(raw, pixels, series_number_offset=500, series_description_suffix=" DN", **RECIPE)
    assert derived.SeriesNumber == raw.SeriesNumber + 500
    again = build_derived(derived, pixels, series_number_offset=500, series_description_suffix=" DN", **RECIPE)
    assert again.SeriesDescription == derived.SeriesDescription == "RAW 25% dose DN"

    raw.SeriesDescription = "X" * 64
    long = build_derived(raw, pixels, **RECIPE).SeriesDescription
    assert len(long) == 64 and long.endswith(" RESTORED")


def test_pixels_are_rounded_and_clipped_to_bits_stored(raw: Dataset) -> None:
    raw.Rows, raw.Columns = 2, 4
    raw.PixelData = np.zeros((2, 4), np.uint16).tobytes()
    floats = np.array([[-5.0, 0.4, 2.49, 2.51], [16382.6, 16383.4, 16383.6, 1e9]])
    derived = build_derived(raw, floats, **RECIPE)
    expected = np.array([[0, 0, 2, 3], [16383, MAX_14_BIT, MAX_14_BIT, MAX_14_BIT]], np.uint16)
    decoded = read_mammogram(dataset_bytes(derived)).pixels
    print("rounded and clipped:", decoded.tolist())
    assert np.array_equal(decoded, expected)
    assert (derived.BitsAllocated, derived.BitsStored, derived.HighBit, derived.PixelRepresentation) == (16, 14, 13, 0)

    integers = np.array([[-1, 0, 7, 16383], [16384, 70000, 12, 1]], dtype=np.int64)
    decoded = read_mammogram(dataset_bytes(build_derived(raw, integers, **RECIPE))).pixels
    assert np.array_equal(decoded, np.clip(integers, 0, MAX_14_BIT))


def test_non_latin_text_is_kept_and_source_text_survives(pixels: np.ndarray, tmp_path: Path) -> None:
    """A noise description with "λ" and "σe" must not become "?" in a Latin-1 source."""
    source = raw_mammogram_dataset(pixels, seed=2, patient_name="Müller^Anna")
    assert source.SpecificCharacterSet == "ISO_IR 100"
    save_dataset(source, tmp_path / "raw.dcm")
    image = read_mammogram(tmp_path / "raw.dcm")
    derived = build_derived(image.dataset, image.pixels, description="noise: λ=3.2, σe=1.5", **RECIPE)
    save_dataset(derived, tmp_path / "derived.dcm")
    written = pydicom.dcmread(tmp_path / "derived.dcm")
    assert "λ=3.2, σe=1.5" in written.DerivationDescription
    assert written.PatientName == "Müller^Anna"
    assert dciodvfy_errors(tmp_path / "derived.dcm") == []


def _with_nan(pixels: np.ndarray) -> np.ndarray:
    broken = pixels.astype(float)
    broken[3, 3] = np.nan
    return broken


@pytest.mark.parametrize(
    ("unusable", "match"),
    [
        pytest.param(lambda pixels: pixels[:-1], "shape", id="one-row-short"),
        pytest.param(_with_nan, "NaN", id="a-nan-pixel"),
    ],
)
def test_unusable_pixels_are_refused(unusable, match: str, raw: Dataset, pixels: np.ndarray) -> None:
    with pytest.raises(ValueError, match=match):
        build_derived(raw, unusable(pixels), **RECIPE)


@pytest.mark.parametrize("variant", ["default", "mlo-right-flat-field"])
def test_synthetic_raw_input_passes_dciodvfy(variant: str, pixels: np.ndarray, tmp_path: Path) -> None:
    options = {} if variant == "default" else dict(view="MLO", laterality="R", flat_field=True, dose_label="50%")
    path = tmp_path / "raw.dcm"
    save_dataset(raw_mammogram_dataset(pixels, seed=1, **options), path)
    assert dciodvfy_errors(path) == []


def test_derived_from_for_processing_passes_dciodvfy(raw: Dataset, pixels: np.ndarray, tmp_path: Path) -> None:
    save_dataset(raw, tmp_path / "raw.dcm")
    assert dciodvfy_errors(tmp_path / "raw.dcm") == []
    source = read_mammogram(tmp_path / "raw.dcm")
    save_dataset(build_derived(source.dataset, source.pixels * 0.98 + 3.3, **RECIPE), tmp_path / "derived.dcm")
    assert dciodvfy_errors(tmp_path / "derived.dcm") == []


def test_derived_from_for_presentation_passes_dciodvfy(
    presentation: Dataset, pixels: np.ndarray, tmp_path: Path
) -> None:
    save_dataset(presentation, tmp_path / "presentation.dcm")
    assert dciodvfy_errors(tmp_path / "presentation.dcm") == []
    source = read_mammogram(tmp_path / "presentation.dcm")
    save_dataset(build_derived(source.dataset, source.pixels, **RECIPE), tmp_path / "derived.dcm")
    assert dciodvfy_errors(tmp_path / "derived.dcm") == []


ENCODED_SOURCES = {
    "j2k": (pydicom.uid.JPEG2000Lossless, lambda src, dst: gdcmconv(src, dst, "--j2k")),
    "jpegls": (pydicom.uid.JPEGLSLossless, lambda src, dst: dcmtk_convert("dcmcjpls", src, dst)),
    "implicit": (pydicom.uid.ImplicitVRLittleEndian, lambda src, dst: gdcmconv(src, dst, "--implicit")),
    "big-endian": (pydicom.uid.ExplicitVRBigEndian, lambda src, dst: dcmtk_convert("dcmconv", src, dst, "+tb")),
}


@pytest.mark.parametrize("encoding", ENCODED_SOURCES)
def test_any_source_syntax_gives_explicit_little_endian(
    encoding: str, raw: Dataset, pixels: np.ndarray, tmp_path: Path
) -> None:
    syntax, encode = ENCODED_SOURCES[encoding]
    save_dataset(raw, tmp_path / "raw.dcm")
    source = read_mammogram(encode(tmp_path / "raw.dcm", tmp_path / "source.dcm"))
    assert source.transfer_syntax_uid == syntax

    path = tmp_path / "derived.dcm"
    save_dataset(build_derived(source.dataset, source.pixels, **RECIPE), path)
    assert transfer_syntax_of(path) == ExplicitVRLittleEndian
    assert dciodvfy_errors(path) == []
    assert len(pydicom.dcmread(path).PixelData) == pixels.size * 2
    assert np.array_equal(read_mammogram(path).pixels, pixels)


def test_dciodvfy_catches_an_invented_image_type(raw: Dataset, pixels: np.ndarray, tmp_path: Path) -> None:
    """The conformance check is not vacuous: the third Image Type value docs/dicom.md warns about is caught."""
    derived = build_derived(raw, pixels, **RECIPE)
    derived.ImageType = ["DERIVED", "PRIMARY", "RESTORED"]
    save_dataset(derived, tmp_path / "invented.dcm")
    errors = dciodvfy_errors(tmp_path / "invented.dcm")
    print(errors)
    assert any("Image Type" in error for error in errors)


def test_save_dataset_replaces_atomically(raw: Dataset, pixels: np.ndarray, tmp_path: Path) -> None:
    path = tmp_path / "out.dcm"
    path.write_bytes(b"old content")
    derived = build_derived(raw, pixels, **RECIPE)
    save_dataset(derived, path)
    assert path.read_bytes() == dataset_bytes(derived)
    assert [p.name for p in tmp_path.iterdir()] == ["out.dcm"], "no temporary file left behind"
