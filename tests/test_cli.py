"""The `dicom-node process` contract and its error paths: one line, non-zero exit, no traceback."""

import json
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
from dicom_node.restore.noise import NoiseModel
from dicom_node.sim.acquisition import acquire
from dicom_node.sim.phantom import make_phantom
from dicomtools import dciodvfy_errors

SIM = NoiseModel(0.1, 3.0, 50.0)  # the embedded defaults' SIM-0001 detector


@pytest.fixture(scope="module")
def half_dose_file(tmp_path_factory) -> Path:
    phantom = make_phantom((160, 128), seed=3)
    pixels = acquire(phantom.signal, SIM, dose_fraction=0.5, rng_or_seed=1)
    path = tmp_path_factory.mktemp("in") / "half.dcm"
    save_dataset(raw_mammogram_dataset(pixels, seed=3, detector_serial="SIM-0001"), path)
    return path


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


def test_process_writes_a_valid_derived_image_and_json_report(capsys, tmp_path, half_dose_file):
    out_path = tmp_path / "out.dcm"
    code, out, err = run(capsys, "process", str(half_dose_file), str(out_path),
                         "--pipeline", "gat-bm3d", "--dose-fraction", "0.5", "--json")
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
    source = read_mammogram(half_dose_file).pixels.astype(float) - SIM.offset
    restored = read_mammogram(out_path).pixels.astype(float) - SIM.offset
    ratio = np.median(restored[source > 50]) / np.median(source[source > 50])
    print(f"restored/input signal ratio {ratio:.3f}")
    assert 1.9 < ratio < 2.1


def test_flags_override_the_detector_entry(capsys, tmp_path, half_dose_file):
    code, out, err = run(capsys, "process", str(half_dose_file), str(tmp_path / "o.dcm"), "--dose-fraction", "0.5",
                         "--gain", "0.1", "--electronic-noise", "3", "--offset", "50", "--json")
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


def test_unknown_detector_without_flags_is_refused(capsys, tmp_path):
    pixels = np.full((64, 48), 500, np.uint16)
    path = tmp_path / "unknown.dcm"
    save_dataset(raw_mammogram_dataset(pixels, seed=1, detector_serial="HOLOGIC-123"), path)
    code, _, err = run(capsys, "process", str(path), str(tmp_path / "o.dcm"), "--dose-fraction", "0.5")
    assert_one_line_error(code, err, "HOLOGIC-123", "--gain", "calibrate")
    assert not (tmp_path / "o.dcm").exists()


def test_non_mammogram_is_refused(capsys, tmp_path):
    ds = raw_mammogram_dataset(np.full((64, 48), 500, np.uint16), seed=1)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    path = tmp_path / "ct.dcm"
    ds.save_as(path, enforce_file_format=True)
    code, _, err = run(capsys, "process", str(path), str(tmp_path / "o.dcm"), "--dose-fraction", "0.5")
    assert_one_line_error(code, err, "not a mammogram")


def test_missing_pixel_data_is_refused(capsys, tmp_path):
    ds = raw_mammogram_dataset(np.full((64, 48), 500, np.uint16), seed=1)
    del ds.PixelData
    path = tmp_path / "nopixels.dcm"
    ds.save_as(path, enforce_file_format=True)
    code, _, err = run(capsys, "process", str(path), str(tmp_path / "o.dcm"), "--dose-fraction", "0.5")
    assert_one_line_error(code, err, "no pixel data")


def test_unsupported_transfer_syntax_is_refused(capsys, tmp_path):
    ds = raw_mammogram_dataset(np.full((64, 48), 500, np.uint16), seed=1)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.50"  # JPEG Baseline (lossy)
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xd9"])
    ds["PixelData"].VR = "OB"
    path = tmp_path / "lossy.dcm"
    ds.save_as(path, enforce_file_format=True)
    code, _, err = run(capsys, "process", str(path), str(tmp_path / "o.dcm"), "--dose-fraction", "0.5")
    assert_one_line_error(code, err, "JPEG Baseline")


@pytest.mark.parametrize("content", [b"", b"not a dicom file at all\n" * 20, b"DICM" * 100])
def test_corrupt_file_is_refused(capsys, tmp_path, content):
    path = tmp_path / "corrupt.dcm"
    path.write_bytes(content)
    code, _, err = run(capsys, "process", str(path), str(tmp_path / "o.dcm"), "--dose-fraction", "0.5")
    assert_one_line_error(code, err, "corrupt.dcm")


def test_missing_input_and_bad_flags(capsys, tmp_path, half_dose_file):
    code, _, err = run(capsys, "process", str(tmp_path / "absent.dcm"), str(tmp_path / "o.dcm"), "--dose-fraction", "0.5")
    assert_one_line_error(code, err, "absent.dcm")
    code, _, err = run(capsys, "process", str(half_dose_file), str(tmp_path / "o.dcm"), "--dose-fraction", "1.5")
    assert_one_line_error(code, err, "dose fraction")
    code, _, err = run(capsys, "process", str(half_dose_file), str(tmp_path / "o.dcm"), "--dose-fraction", "half")
    assert_one_line_error(code, err, "--dose-fraction")
    code, _, err = run(capsys, "process", str(half_dose_file), str(tmp_path / "o.dcm"), "--dose-fraction", "0.5",
                       "--pipeline", "magic")
    assert_one_line_error(code, err, "magic", "gat-bm3d")
    code, _, err = run(capsys, "process", str(half_dose_file), str(tmp_path / "o.dcm"))
    assert_one_line_error(code, err, "--dose-fraction")


def test_bad_config_is_one_line(capsys, tmp_path, half_dose_file):
    bad = tmp_path / "bad.toml"
    bad.write_text("[node]\nport = 'eleven'\n")
    code, _, err = run(capsys, "process", str(half_dose_file), str(tmp_path / "o.dcm"), "--dose-fraction", "0.5",
                       "--config", str(bad))
    assert_one_line_error(code, err, "node.port")


def test_unwritable_output_is_one_line(capsys, tmp_path, half_dose_file):
    code, _, err = run(capsys, "process", str(half_dose_file), str(tmp_path / "no" / "such" / "dir" / "o.dcm"),
                       "--dose-fraction", "0.5")
    assert_one_line_error(code, err, "cannot write")


def test_console_script_and_module_entry_point(tmp_path):
    for command in (["dicom-node"], [sys.executable, "-m", "dicom_node"]):
        exe = command if command[0] != "dicom-node" else [str(Path(sys.executable).with_name("dicom-node"))]
        result = subprocess.run([*exe, "process", str(tmp_path / "x.dcm"), str(tmp_path / "y.dcm"),
                                 "--dose-fraction", "0.5"], capture_output=True, text=True, timeout=120)
        print(result.stderr.strip())
        assert result.returncode != 0
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_process_with_the_shipped_deep_model(capsys, tmp_path, half_dose_file, monkeypatch):
    monkeypatch.delenv("DICOM_NODE_MODEL_DIR", raising=False)
    out_path = tmp_path / "deep.dcm"
    code, out, err = run(capsys, "process", str(half_dose_file), str(out_path), "--pipeline", "deep",
                         "--dose-fraction", "0.5", "--json")
    assert code == 0, err
    report = json.loads(out)
    print(json.dumps(report["model"]), report["timings_s"])
    assert report["model"]["name"] == "hresnet-phantom-50" and len(report["model"]["digest"]) == 64
    derived = dcmread(out_path)
    assert "hresnet-phantom-50" in derived.DerivationDescription
    assert dciodvfy_errors(out_path) == []
    assert report["qc"]["mean_ratio"] == pytest.approx(1.0, abs=0.03)


def test_deep_without_a_model_for_the_dose_is_one_line(capsys, tmp_path, half_dose_file):
    code, _, err = run(capsys, "process", str(half_dose_file), str(tmp_path / "o.dcm"), "--pipeline", "deep",
                       "--dose-fraction", "0.3")
    assert_one_line_error(code, err, "no default model for dose fraction 0.3", "0.5")
    code, _, err = run(capsys, "process", str(half_dose_file), str(tmp_path / "o.dcm"), "--pipeline", "deep",
                       "--dose-fraction", "0.5", "--model", "nonexistent")
    assert_one_line_error(code, err, "nonexistent")
