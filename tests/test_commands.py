"""`dicom-node phantom`, `calibrate` and `demo`: the tools radiology IT and QA run by hand."""

import json
import tomllib

import numpy as np
import pytest

from dicom_node.cli import main
from dicom_node.config import load_config
from dicom_node.detectors import detector_noise
from dicom_node.imaging import read_mammogram

from dicomtools import dciodvfy_errors


def run(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out, err = capsys.readouterr()
    return info.value.code, out, err


def test_phantom_writes_valid_raw_mammograms_and_truth(capsys, tmp_path):
    code, out, err = run(
        capsys,
        "phantom",
        str(tmp_path),
        "--seed",
        "4",
        "--size",
        "160x128",
        "--dose",
        "1",
        "--dose",
        "0.5",
        "--repeats",
        "2",
    )
    assert code == 0, err
    manifest = json.loads((tmp_path / "phantom.json").read_text())
    assert sorted(manifest["files"]) == ["0.5", "1"]
    truth = np.load(tmp_path / "truth-seed4.npy")
    mask = np.load(tmp_path / "mask-seed4.npy")
    assert truth.shape == (160, 128) and mask.dtype == bool
    full = [read_mammogram(tmp_path / name) for name in manifest["files"]["1"]]
    half = [read_mammogram(tmp_path / name) for name in manifest["files"]["0.5"]]
    assert not np.array_equal(full[0].pixels, full[1].pixels)  # independent noise per repeat
    assert full[0].params.detector_serial == "SIM-0001"
    assert full[0].params.exposure_mas == pytest.approx(2 * half[0].params.exposure_mas)
    ratio = (np.mean(half[0].pixels[mask]) - 50) / (np.mean(full[0].pixels[mask]) - 50)
    print(f"half/full dose signal ratio in the breast: {ratio:.3f}")
    assert ratio == pytest.approx(0.5, abs=0.02)
    assert dciodvfy_errors(tmp_path / manifest["files"]["0.5"][0]) == []
    # Deterministic per seed: the same command writes the same pixels.
    again = tmp_path / "again"
    assert (
        run(capsys, "phantom", str(again), "--seed", "4", "--size", "160x128", "--dose", "0.5", "--repeats", "2")[0]
        == 0
    )
    assert np.array_equal(read_mammogram(again / manifest["files"]["0.5"][0]).pixels, half[0].pixels)


def test_phantom_bad_arguments_are_one_line(capsys, tmp_path):
    for args in (["--size", "big"], ["--dose", "2"], ["--detector", "NOPE"]):
        code, _, err = run(capsys, "phantom", str(tmp_path), *args)
        print(err.strip())
        assert code != 0 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_calibrate_recovers_the_simulated_detector(capsys, tmp_path):
    flats = tmp_path / "flats"
    code, _, err = run(capsys, "phantom", str(flats), "--flat-field", "--size", "256x208", "--repeats", "2")
    assert code == 0, err
    files = sorted(str(p) for p in flats.glob("*.dcm"))
    assert len(files) == 8
    assert dciodvfy_errors(files[0]) == []
    entry_file = tmp_path / "detector.toml"
    code, _, err = run(
        capsys, "calibrate", *files, "--output", str(entry_file), "--gain-map", str(tmp_path / "gain.npy")
    )
    print(err)
    assert code == 0, err
    entry = tomllib.loads(entry_file.read_text())["detectors"]["SIM-0001"]
    print(entry)
    truth = load_config().detectors["SIM-0001"]
    assert entry["offset"] == pytest.approx(truth.offset, abs=2.0)
    assert entry["gain"] == pytest.approx(truth.gain, rel=0.05)
    assert entry["electronic_noise"] == pytest.approx(truth.electronic_noise, rel=0.3)
    # The written entry is a valid detector section that the node can load, gain map included.
    config = load_config(entry_file)
    assert detector_noise(config, "SIM-0001", (256, 208)).gain.shape == (256, 208)


def test_calibrate_needs_two_exposures(capsys, tmp_path):
    flats = tmp_path / "flats"
    run(capsys, "phantom", str(flats), "--flat-field", "--size", "64x64", "--exposure", "50", "--repeats", "2")
    code, _, err = run(capsys, "calibrate", *map(str, flats.glob("*.dcm")))
    print(err.strip())
    assert code != 0 and "2 or more distinct exposures" in err and len(err.strip().splitlines()) == 1


def test_demo_reports_noise_and_bias(capsys, tmp_path):
    code, out, err = run(capsys, "demo", str(tmp_path), "--size", "192x160", "--realisations", "2")
    print(out)
    assert code == 0, err
    rows = {r["method"].split()[0]: r for r in json.loads((tmp_path / "report.json").read_text())}
    assert set(rows) == {"FD", "LD", "restored"}
    assert rows["restored"]["mnse_pct"] < rows["LD"]["mnse_pct"]
    assert rows["restored"]["seconds_per_image"] > 0 and rows["FD"]["seconds_per_image"] == 0
    assert len(list((tmp_path / "restored").glob("*.dcm"))) == 2
    assert "| restored (gat-bm3d)" in (tmp_path / "report.md").read_text()
