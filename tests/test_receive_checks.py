"""The receive-time checks: what they refuse from a header and the Pixel Data's bytes, never decoding them.

The end-to-end answers (status, Error Comment, nothing spooled) are in test_receive.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, itemize_fragment
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless

from dicom_node.imaging import raw_mammogram_dataset
from dicom_node.receive.checks import image_problem, pixel_data_problem, pixel_description_problem

NATIVE = ExplicitVRLittleEndian


@pytest.fixture
def good() -> Dataset:
    """A valid raw MG dataset: 40 rows x 24 columns, 16 bits allocated, 14 stored, MONOCHROME2."""
    return raw_mammogram_dataset(np.arange(40 * 24, dtype=np.uint16).reshape(40, 24), seed=1)


def test_a_good_native_dataset_passes(good: Dataset) -> None:
    assert image_problem(good, NATIVE) is None


def test_truncated_pixel_data_names_both_lengths(good: Dataset) -> None:
    good.PixelData = good.PixelData[:1000]
    assert image_problem(good, NATIVE) == "Pixel Data is 1000 bytes, not 1920 (40x24x1x16 bits)"


def test_too_long_pixel_data_is_refused_too(good: Dataset) -> None:
    good.PixelData += bytes(2)
    assert image_problem(good, NATIVE) == "Pixel Data is 1922 bytes, not 1920 (40x24x1x16 bits)"


@pytest.mark.parametrize(
    ("missing", "problem"),
    [
        (("PixelData",), "dataset lacks PixelData"),
        (("Rows",), "dataset lacks Rows"),
        (("BitsStored", "PhotometricInterpretation"), "dataset lacks BitsStored, PhotometricInterpretation"),
    ],
)
def test_missing_attributes_are_named(missing: tuple[str, ...], problem: str, good: Dataset) -> None:
    for keyword in missing:
        delattr(good, keyword)
    assert image_problem(good, NATIVE) == problem


def test_an_empty_value_counts_as_missing(good: Dataset) -> None:
    good.Columns = None
    assert image_problem(good, NATIVE) == "dataset lacks Columns"


def test_monochrome1_is_readable_and_rgb_is_not(good: Dataset) -> None:
    good.PhotometricInterpretation = "MONOCHROME1"
    assert pixel_description_problem(good) is None
    good.PhotometricInterpretation = "RGB"
    assert image_problem(good, NATIVE) == "Photometric Interpretation RGB, not MONOCHROME1 or MONOCHROME2"


@pytest.mark.parametrize(
    ("attributes", "problem"),
    [
        ({"PhotometricInterpretation": "MONOCHROME1"}, "image is MONOCHROME1; For Processing needs MONOCHROME2"),
        ({"BitsAllocated": 8, "BitsStored": 8}, "image has 8 bits allocated; this node takes 16"),
        ({"PixelRepresentation": 1}, "image is not single-sample unsigned grayscale"),
        ({"NumberOfFrames": 2}, "image has 2 frames; this node takes single-frame images"),
    ],
)
def test_readable_pixels_the_worker_would_refuse_are_refused_at_once(good: Dataset, attributes, problem) -> None:
    """What the worker cannot restore is refused while the modality still holds the image, in the
    worker's own words (one check serves both), short enough for the Error Comment."""
    for keyword, value in attributes.items():
        setattr(good, keyword, value)
    assert pixel_description_problem(good) is None
    refused = image_problem(good, NATIVE)
    assert refused is not None and refused.startswith(problem) and len(refused) <= 64


@pytest.mark.parametrize(
    ("attributes", "problem"),
    [
        ({"Rows": 0}, "Rows 0 x Columns 24: both must be above 0"),
        ({"BitsAllocated": 12}, "Bits Allocated 12, not 8 or 16"),
        ({"BitsStored": 17}, "Bits Stored 17, not 1 to Bits Allocated 16"),
        ({"BitsStored": 0}, "Bits Stored 0, not 1 to Bits Allocated 16"),
        ({"PixelRepresentation": 2}, "Pixel Representation 2, not 0 or 1"),
        ({"SamplesPerPixel": 3}, "Samples per Pixel 3, not 1: not a grayscale image"),
        ({"NumberOfFrames": 0}, "Number of Frames 0, not 1 or more"),
    ],
)
def test_absurd_pixel_descriptions_are_refused(attributes: dict, problem: str, good: Dataset) -> None:
    for keyword, value in attributes.items():
        setattr(good, keyword, value)
    assert pixel_description_problem(good) == problem


def test_the_length_counts_frames_and_bits_allocated(good: Dataset) -> None:
    good.NumberOfFrames = 3
    assert pixel_data_problem(good, NATIVE) == "Pixel Data is 1920 bytes, not 5760 (40x24x1x16 bits x 3 frames)"
    good.PixelData *= 3
    assert pixel_data_problem(good, NATIVE) is None


@pytest.mark.parametrize(("length", "accepted"), [(15, True), (16, True), (14, False), (17, False)])
def test_an_odd_length_may_carry_its_padding_byte(length: int, accepted: bool, good: Dataset) -> None:
    """3x5 pixels of 8 bits: 15 bytes, which DICOM pads to an even 16."""
    good.Rows, good.Columns, good.BitsAllocated, good.BitsStored = 3, 5, 8, 8
    good.PixelData = bytes(length)
    assert (pixel_data_problem(good, NATIVE) is None) == accepted


def test_a_full_size_refusal_fits_the_error_comment(good: Dataset) -> None:
    """Error Comment is LO (64 characters): the figures of a 4096x3328 frame still fit, in ASCII."""
    good.Rows, good.Columns = 4096, 3328
    good.PixelData = bytes(4096 * 3328 * 2 - 2)
    problem = pixel_data_problem(good, NATIVE)
    assert problem == "Pixel Data is 27262974 bytes, not 27262976 (4096x3328x1x16 bits)"
    assert len(problem) <= 64 and problem.isascii()


def test_encapsulated_pixel_data_needs_a_fragment(good: Dataset) -> None:
    """Compressed bytes are never decoded: a fragment (here not even a valid JPEG-LS stream) is enough."""
    good.PixelData = encapsulate([b"\xff\xd8 not decoded \xff\xd9"])
    assert image_problem(good, JPEGLSLossless) is None
    good.PixelData = itemize_fragment(b"")  # the Basic Offset Table item alone
    assert image_problem(good, JPEGLSLossless) == "encapsulated Pixel Data holds no fragment"


def test_native_bytes_under_an_encapsulated_syntax_are_malformed(good: Dataset) -> None:
    problem = image_problem(good, JPEGLSLossless)
    assert problem is not None and problem.startswith("encapsulated Pixel Data is malformed: ")
    good.PixelData = b"\xfe\xff\x00\xe0\x00"  # an item tag, then its length cut short
    assert image_problem(good, JPEGLSLossless) == (
        "encapsulated Pixel Data is malformed: unpack requires a buffer of 4 bytes"
    )
