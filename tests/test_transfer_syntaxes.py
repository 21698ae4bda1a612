"""Every accepted transfer syntax decodes bit-exactly; lossy ones are refused with a clear line.

Inputs are made by the real encoders a modality or PACS would use (GDCM, DCMTK) and by pydicom.
"""

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from dicom_node.errors import InputRefused
from dicom_node.imaging import LOSSLESS_TRANSFER_SYNTAXES, raw_mammogram_dataset, read_mammogram, save_dataset

from dicomtools import dcmtk_convert, gdcmconv, transfer_syntax_of

MAX_14_BIT = (1 << 14) - 1


@pytest.fixture(scope="module")
def original() -> np.ndarray:
    """Random 14-bit content with the extreme values present, where encoders tend to slip."""
    pixels = np.random.default_rng(7).integers(0, MAX_14_BIT + 1, size=(256, 192), dtype=np.uint16)
    pixels[0, :8] = 0
    pixels[-1, -8:] = MAX_14_BIT
    pixels[100:110, 50:60] = np.array([0, MAX_14_BIT] * 50, dtype=np.uint16).reshape(10, 10)
    return pixels


@pytest.fixture(scope="module")
def raw_file(original: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("syntaxes") / "raw.dcm"
    save_dataset(raw_mammogram_dataset(original, seed=3), path)
    return path


def _pydicom_rewrite(syntax: str) -> Callable[[Path, Path], None]:
    """Write the same dataset in an uncompressed syntax with pydicom."""

    def rewrite(source: Path, target: Path) -> None:
        ds = pydicom.dcmread(source)
        ds.file_meta.TransferSyntaxUID = syntax
        ds.save_as(target, enforce_file_format=True)

    return rewrite


def _pydicom_compress(syntax: str) -> Callable[[Path, Path], None]:
    def compress(source: Path, target: Path) -> None:
        ds = pydicom.dcmread(source)
        ds.compress(syntax, generate_instance_uid=False)
        ds.save_as(target, enforce_file_format=True)

    return compress


def _gdcm(*options: str) -> Callable[[Path, Path], None]:
    return lambda source, target: gdcmconv(source, target, *options)


def _dcmtk(tool: str, *options: str) -> Callable[[Path, Path], None]:
    return lambda source, target: dcmtk_convert(tool, source, target, *options)


def _copy(source: Path, target: Path) -> None:
    target.write_bytes(source.read_bytes())


LOSSLESS_ENCODINGS = {
    "explicit-le": (ExplicitVRLittleEndian, _copy),
    "implicit-le-pydicom": (ImplicitVRLittleEndian, _pydicom_rewrite(ImplicitVRLittleEndian)),
    "implicit-le-gdcm": (ImplicitVRLittleEndian, _gdcm("--implicit")),
    "deflated-pydicom": (DeflatedExplicitVRLittleEndian, _pydicom_rewrite(DeflatedExplicitVRLittleEndian)),
    "deflated-gdcm": (DeflatedExplicitVRLittleEndian, _gdcm("--deflated")),
    "big-endian-dcmconv": (ExplicitVRBigEndian, _dcmtk("dcmconv", "+tb")),
    "j2k-gdcm": (JPEG2000Lossless, _gdcm("--j2k")),
    "j2k-pydicom": (JPEG2000Lossless, _pydicom_compress(JPEG2000Lossless)),
    "jpegls-dcmcjpls": (JPEGLSLossless, _dcmtk("dcmcjpls")),
    "jpegls-gdcm": (JPEGLSLossless, _gdcm("--jpegls")),
    "jpegls-pydicom": (JPEGLSLossless, _pydicom_compress(JPEGLSLossless)),
    "jpeg-sv1-gdcm": (JPEGLosslessSV1, _gdcm("--jpeg")),
    "jpeg-sv1-dcmcjpeg": (JPEGLosslessSV1, _dcmtk("dcmcjpeg", "+e1")),
    "jpeg-p14-dcmcjpeg": (JPEGLossless, _dcmtk("dcmcjpeg", "+el")),
    "rle-gdcm": (RLELossless, _gdcm("--rle")),
    "rle-dcmcrle": (RLELossless, _dcmtk("dcmcrle")),
    "rle-pydicom": (RLELossless, _pydicom_compress(RLELossless)),
}


def test_every_accepted_syntax_is_exercised() -> None:
    assert {syntax for syntax, _ in LOSSLESS_ENCODINGS.values()} == set(LOSSLESS_TRANSFER_SYNTAXES)


@pytest.mark.parametrize("encoding", LOSSLESS_ENCODINGS)
def test_lossless_syntax_decodes_bit_exactly(
    encoding: str, raw_file: Path, original: np.ndarray, tmp_path: Path
) -> None:
    syntax, encode = LOSSLESS_ENCODINGS[encoding]
    target = tmp_path / f"{encoding}.dcm"
    encode(raw_file, target)
    assert transfer_syntax_of(target) == syntax

    started = time.perf_counter()
    image = read_mammogram(target)
    elapsed_ms = 1000 * (time.perf_counter() - started)
    print(f"{encoding}: {target.stat().st_size} bytes, read in {elapsed_ms:.1f} ms")

    assert image.transfer_syntax_uid == syntax
    assert image.pixels.dtype == np.uint16
    assert np.array_equal(image.pixels, original)
    assert image.params.bits_stored == 14


def _eight_bit(source: Path, target: Path) -> None:
    """JPEG Baseline holds only 8-bit samples: store the top 8 of the 14 bits."""
    ds = pydicom.dcmread(source)
    ds.PixelData = (ds.pixel_array >> 6).astype(np.uint8).tobytes()
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds["PixelData"].VR = "OB"
    ds.save_as(target, enforce_file_format=True)


LOSSY_ENCODINGS = {
    "jpeg-baseline": (JPEGBaseline8Bit, ("--jpeg", "--lossy", "-q", "90"), True),
    "jpeg-extended": (JPEGExtended12Bit, ("--jpeg", "--lossy", "-q", "90"), False),
    "jpegls-near-lossless": (JPEGLSNearLossless, ("--jpegls", "--lossy", "-e", "2"), False),
    "j2k-irreversible": (JPEG2000, ("--j2k", "--lossy", "-q", "40"), False),
}


@pytest.mark.parametrize("encoding", LOSSY_ENCODINGS)
def test_lossy_syntax_is_refused(encoding: str, raw_file: Path, tmp_path: Path) -> None:
    syntax, options, eight_bit = LOSSY_ENCODINGS[encoding]
    source = raw_file
    if eight_bit:
        source = tmp_path / "eight_bit.dcm"
        _eight_bit(raw_file, source)
    target = gdcmconv(source, tmp_path / "IN.dcm", *options)
    assert transfer_syntax_of(target) == syntax

    with pytest.raises(InputRefused) as refused:
        read_mammogram(target)
    message = str(refused.value)
    print(message)
    assert message.startswith("IN.dcm uses transfer syntax")
    assert syntax in message and "lossy" in message
    assert "\n" not in message
