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
    kernel_file = tmp_path / "kernel.npy"
    code, _, err = run(
        capsys,
        "calibrate",
        *files,
        "--output",
        str(entry_file),
        "--gain-map",
        str(tmp_path / "gain.npy"),
        "--noise-kernel",
        str(kernel_file),
    )
    print(err)
    assert code == 0, err
    entry = tomllib.loads(entry_file.read_text())["detectors"]["SIM-0001"]
    print(entry)
    truth = load_config().detectors["SIM-0001"]
    assert entry["offset"] == pytest.approx(truth.offset, abs=2.0)
    assert entry["gain"] == pytest.approx(truth.gain, rel=0.05)
    assert entry["electronic_noise"] == pytest.approx(truth.electronic_noise, rel=0.3)
    # The simulated detector's noise is white: the neighbour correlation is printed, no kernel is stored.
    assert "noise correlation at 100, 150 mAs: neighbours" in err and "white within the measurement error" in err
    assert "noise_kernel" not in entry and not kernel_file.exists()
    # The written entry is a valid detector section that the node can load, gain map included.
    config = load_config(entry_file)
    noise = detector_noise(config, "SIM-0001", (256, 208))
    assert noise.gain.shape == (256, 208) and noise.kernel is None


def test_calibrate_stores_the_kernel_of_correlated_noise(capsys, tmp_path):
    """Flat fields of a detector with 3×3 crosstalk (strength 0.5) → an entry whose noise_kernel loads.

    `phantom` simulates the configured detector's kernel; at these exposures (8000–12000 ADU,
    λ = 0.1, σe = 3) quantum noise is 99 % of the variance, so the GAT-domain kernel is close to
    the crosstalk kernel itself: its neighbour correlation is α·0.642 with α ≈ 0.991.
    """
    from dicom_node.sim.acquisition import crosstalk_kernel

    crosstalk = crosstalk_kernel(0.5)
    np.save(tmp_path / "crosstalk.npy", crosstalk)
    simulated = tmp_path / "simulated.toml"
    simulated.write_text(
        "[detectors.CSI-0001]\ngain = 0.1\nelectronic_noise = 3.0\noffset = 50.0\nnoise_kernel = 'crosstalk.npy'\n"
    )
    flats = tmp_path / "flats"
    args = ("--flat-field", "--size", "256x208", "--detector", "CSI-0001", "--config", str(simulated))
    code, _, err = run(capsys, "phantom", str(flats), *args)
    assert code == 0, err
    files = sorted(str(p) for p in flats.glob("*.dcm"))

    (tmp_path / "node").mkdir()
    entry_file = tmp_path / "node" / "detector.toml"
    kernel_file = tmp_path / "node" / "detectors" / "CSI-0001-kernel.npy"
    kernel_file.parent.mkdir()
    code, out, err = run(capsys, "calibrate", *files, "--output", str(entry_file), "--noise-kernel", str(kernel_file))
    assert code == 0, err
    report = err
    assert "correlated, 3×3 kernel" in err and f"noise kernel stored in {kernel_file}" in err
    entry = tomllib.loads(entry_file.read_text())["detectors"]["CSI-0001"]
    assert entry["noise_kernel"] == "detectors/CSI-0001-kernel.npy"  # relative to the entry's file
    assert entry["gain"] == pytest.approx(0.1, rel=0.05)
    noise = detector_noise(load_config(entry_file), "CSI-0001")
    kernel = np.load(kernel_file)
    assert np.array_equal(noise.kernel, kernel) and abs(np.sum(kernel**2) - 1) < 1e-9
    alpha = np.mean([0.1 * s / (0.1 * s + 9.0) for s in (8000.0, 12000.0)])
    expected = alpha * float(np.sum(crosstalk[1:, :] * crosstalk[:-1, :]))
    measured = float(np.sum(kernel[1:, :] * kernel[:-1, :]))
    report += f"entry {entry}; kernel's neighbour correlation {measured:.4f}, expected {expected:.4f}"
    assert measured == pytest.approx(expected, abs=0.02)

    # Without --noise-kernel the entry cannot name a kernel, and calibrate says how to store it.
    capsys.readouterr()  # what this test printed so far
    code, out, err = run(capsys, "calibrate", *files)
    assert code == 0 and "pass --noise-kernel" in err
    assert "noise_kernel" not in tomllib.loads(out)["detectors"]["CSI-0001"]
    print(report)


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

    def not_json(name):
        raise AssertionError(f"report.json holds {name}: not strict JSON")

    report = json.loads((tmp_path / "report.json").read_text(), parse_constant=not_json)
    rows = {r["method"].split()[0]: r for r in report}
    assert set(rows) == {"FD", "LD", "restored"}
    assert rows["restored"]["mnse_pct"] < rows["LD"]["mnse_pct"]
    assert rows["restored"]["seconds_per_image"] > 0 and rows["FD"]["seconds_per_image"] == 0
    assert len(list((tmp_path / "restored").glob("*.dcm"))) == 2
    assert "| restored (gat-bm3d)" in (tmp_path / "report.md").read_text()
