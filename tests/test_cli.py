"""The `dicom-node process` contract and its error paths: one line, non-zero exit, no traceback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.cli import main
from dicom_node.imaging import raw_mammogram_dataset, read_mammogram, save_dataset

from dicomtools import dciodvfy_errors, low_dose_mammogram


@pytest.fixture(scope="module")
def half_dose_file(tmp_path_factory) -> Path:
    """A half-dose phantom from the embedded defaults' SIM-0001 detector."""
    return low_dose_mammogram(
        tmp_path_factory.mktemp("in") / "half.dcm",
        seed=3,
        shape=(160, 128),
        dose_fraction=0.5,
        noise_seed=1,
        detector_serial="SIM-0001",
    )


def run(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out, err = capsys.readouterr()
    return info.value.code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    print(err.strip())
    assert code != 0
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    for fragment in fragments:
        assert fragment in err


def test_process_writes_a_valid_derived_image_and_json_report(capsys, tmp_path, half_dose_file, sim_noise):
    out_path = tmp_path / "out.dcm"
    code, out, err = run(
        capsys,
        "process",
        str(half_dose_file),
        str(out_path),
        "--pipeline",
        "gat-bm3d",
        "--dose-fraction",
        "0.5",
        "--json",
    )
    assert code == 0, err
    report = json.loads(out)
    print(json.dumps(report, indent=1))
    assert report["pipeline"] == "gat-bm3d"
    assert report["noise"]["source"] == "detector SIM-0001"
    assert {"read", "derive", "write", "total"} <= set(report["timings_s"])
    assert all(v >= 0 for v in report["timings_s"].values())
    assert report["qc"]
    derived = dcmread(out_path)
    assert derived.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert derived.SOPInstanceUID == report["sop_instance_uid"]
    assert list(derived.ImageType)[:2] == ["DERIVED", "PRIMARY"]
    assert dciodvfy_errors(out_path) == []
    # The output is on the full-dose scale: about twice the input's signal above the offset.
    source = read_mammogram(half_dose_file).pixels.astype(float) - sim_noise.offset
    restored = read_mammogram(out_path).pixels.astype(float) - sim_noise.offset
    ratio = np.median(restored[source > 50]) / np.median(source[source > 50])
    print(f"restored/input signal ratio {ratio:.3f}")
    assert 1.9 < ratio < 2.1


def test_flags_override_the_detector_entry(capsys, tmp_path, half_dose_file):
    code, out, err = run(
        capsys,
        "process",
        str(half_dose_file),
        str(tmp_path / "o.dcm"),
        "--dose-fraction",
        "0.5",
        "--gain",
        "0.1",
        "--electronic-noise",
        "3",
        "--offset",
        "50",
        "--json",
    )
    assert code == 0, err
    assert json.loads(out)["noise"]["source"] == "command line"


def test_reprocessing_gives_the_same_uids(capsys, tmp_path, half_dose_file):
    uids = []
    for name in ("a.dcm", "b.dcm"):
        code, out, err = run(capsys, "process", str(half_dose_file), str(tmp_path / name), "--dose-fraction", "0.5")
        assert code == 0, err
        ds = dcmread(tmp_path / name)
        uids.append((ds.SOPInstanceUID, ds.SeriesInstanceUID))
    assert uids[0] == uids[1]


def _plain_image(**options):
    return raw_mammogram_dataset(np.full((80, 64), 500, np.uint16), seed=1, **options)  # restorable size


def _unknown_detector(tmp_path: Path) -> Path:
    path = tmp_path / "unknown.dcm"
    save_dataset(_plain_image(detector_serial="HOLOGIC-123"), path)
    return path


def _ct_image(tmp_path: Path) -> Path:
    ds = _plain_image()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    ds.save_as(tmp_path / "ct.dcm", enforce_file_format=True)
    return tmp_path / "ct.dcm"


def _no_pixel_data(tmp_path: Path) -> Path:
    ds = _plain_image()
    del ds.PixelData
    ds.save_as(tmp_path / "nopixels.dcm", enforce_file_format=True)
    return tmp_path / "nopixels.dcm"


def _lossy_jpeg(tmp_path: Path) -> Path:
    ds = _plain_image()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.50"  # JPEG Baseline (lossy)
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "lossy.dcm", enforce_file_format=True)
    return tmp_path / "lossy.dcm"


def _file_of(content: bytes):
    def write(tmp_path: Path) -> Path:
        (tmp_path / "corrupt.dcm").write_bytes(content)
        return tmp_path / "corrupt.dcm"

    return write


REFUSED_INPUTS = [
    pytest.param(_unknown_detector, ("HOLOGIC-123", "--gain", "calibrate"), id="unknown-detector-without-flags"),
    pytest.param(_ct_image, ("not a mammogram",), id="ct-image"),
    pytest.param(_no_pixel_data, ("no pixel data",), id="no-pixel-data"),
    pytest.param(_lossy_jpeg, ("JPEG Baseline",), id="lossy-transfer-syntax"),
    pytest.param(_file_of(b""), ("corrupt.dcm",), id="empty-file"),
    pytest.param(_file_of(b"not a dicom file at all\n" * 20), ("corrupt.dcm",), id="text-file"),
    pytest.param(_file_of(b"DICM" * 100), ("corrupt.dcm",), id="dicm-and-nothing-else"),
]


@pytest.mark.parametrize(("make_input", "fragments"), REFUSED_INPUTS)
def test_refused_input_is_one_line_and_writes_nothing(capsys, tmp_path, make_input, fragments):
    code, _, err = run(capsys, "process", str(make_input(tmp_path)), str(tmp_path / "o.dcm"), "--dose-fraction", "0.5")
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "o.dcm").exists()


# `process` arguments: {input} is a good half-dose file, {out} tmp_path/o.dcm, {tmp} tmp_path.
REFUSED_ARGUMENTS = [
    pytest.param(("{tmp}/absent.dcm", "{out}", "--dose-fraction", "0.5"), ("absent.dcm",), id="missing-input"),
    pytest.param(("{input}", "{out}", "--dose-fraction", "1.5"), ("dose fraction",), id="dose-fraction-above-one"),
    pytest.param(
        ("{input}", "{out}", "--dose-fraction", "half"), ("--dose-fraction",), id="dose-fraction-not-a-number"
    ),
    pytest.param(
        ("{input}", "{out}", "--dose-fraction", "0.5", "--pipeline", "magic"),
        ("magic", "gat-bm3d"),
        id="unknown-pipeline",
    ),
    pytest.param(("{input}", "{out}"), ("--dose-fraction",), id="no-dose-fraction"),
    pytest.param(
        ("{input}", "{tmp}/no/such/dir/o.dcm", "--dose-fraction", "0.5"), ("cannot write",), id="unwritable-output"
    ),
    pytest.param(
        ("{input}", "{out}", "--pipeline", "deep", "--dose-fraction", "0.3"),
        ("no default model for dose fraction 0.3", "0.5"),
        id="deep-without-a-model-for-the-dose",
    ),
    pytest.param(
        ("{input}", "{out}", "--pipeline", "deep", "--dose-fraction", "0.5", "--model", "nonexistent"),
        ("nonexistent",),
        id="deep-with-an-unknown-model",
    ),
]


@pytest.mark.parametrize(("arguments", "fragments"), REFUSED_ARGUMENTS)
def test_refused_arguments_are_one_line(capsys, tmp_path, half_dose_file, arguments, fragments):
    args = [a.format(input=half_dose_file, out=tmp_path / "o.dcm", tmp=tmp_path) for a in arguments]
    code, _, err = run(capsys, "process", *args)
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "o.dcm").exists()


@pytest.mark.parametrize("how", ["same-path", "through-a-symlink", "through-dot-dot", "through-a-hard-link"])
def test_process_never_writes_over_its_input(capsys, tmp_path, half_dose_file, how):
    source = tmp_path / "in.dcm"
    source.write_bytes(half_dose_file.read_bytes())
    output = {
        "same-path": source,
        "through-a-symlink": tmp_path / "link.dcm",
        "through-dot-dot": tmp_path / "sub" / ".." / "in.dcm",
        "through-a-hard-link": tmp_path / "hard.dcm",
    }[how]
    if how == "through-a-symlink":
        output.symlink_to(source)
    elif how == "through-dot-dot":
        (tmp_path / "sub").mkdir()
    elif how == "through-a-hard-link":
        os.link(source, output)
    code, out, err = run(capsys, "process", str(source), str(output), "--dose-fraction", "0.5")
    assert_one_line_error(code, err, str(output), "is the input file")
    assert code == 2 and out == ""
    assert source.read_bytes() == half_dose_file.read_bytes()


def test_bad_config_is_one_line(capsys, tmp_path, half_dose_file, config_file):
    bad = config_file("[node]\nport = 'eleven'\n", "bad.toml")
    code, _, err = run(
        capsys, "process", str(half_dose_file), str(tmp_path / "o.dcm"), "--dose-fraction", "0.5", "--config", str(bad)
    )
    assert_one_line_error(code, err, "node.port")


@pytest.mark.parametrize(
    "exe",
    [
        pytest.param([str(Path(sys.executable).with_name("dicom-node"))], id="console-script"),
        pytest.param([sys.executable, "-m", "dicom_node"], id="python-m-dicom_node"),
    ],
)
def test_console_script_and_module_entry_point(tmp_path, exe):
    result = subprocess.run(
        [*exe, "process", str(tmp_path / "x.dcm"), str(tmp_path / "y.dcm"), "--dose-fraction", "0.5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    print(result.stderr.strip())
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "x.dcm" in result.stderr  # the refusal names the missing input, not some start-up failure


@pytest.mark.parametrize("dose", ["0.5", "0.25"])
def test_process_with_the_shipped_deep_model(capsys, tmp_path, half_dose_file, monkeypatch, dose):
    """The deep pipeline's default model for half and for quarter dose, chosen by the dose fraction."""
    monkeypatch.delenv("DICOM_NODE_MODEL_DIR", raising=False)
    source = half_dose_file
    if dose == "0.25":
        source = low_dose_mammogram(
            tmp_path / "quarter.dcm",
            seed=3,
            shape=(160, 128),
            dose_fraction=0.25,
            noise_seed=1,
            detector_serial="SIM-0001",
        )
    out_path = tmp_path / "deep.dcm"
    code, out, err = run(
        capsys, "process", str(source), str(out_path), "--pipeline", "deep", "--dose-fraction", dose, "--json"
    )
    assert code == 0, err
    report = json.loads(out)
    print(json.dumps(report["model"]), report["timings_s"])
    assert report["model"]["name"] == "gat-dncnn-maps" and len(report["model"]["digest"]) == 64
    derived = dcmread(out_path)
    assert "gat-dncnn-maps" in derived.DerivationDescription
    assert dciodvfy_errors(out_path) == []
    assert report["qc"]["mean_ratio"] == pytest.approx(1.0, abs=0.03)
