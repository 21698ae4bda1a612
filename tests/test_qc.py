"""Per-image QC figures (dicom_node.restore.qc) on phantoms and detectors kept apart from the ones
the estimator was developed on (seeds 900–999, detectors (0.07, 4, 80), (0.3, 1.5, 20), (0.12, 6, 40)),
their thresholds and flags, and what the worker stores: flags, a held job, thumbnails."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from dicom_node.config import DEFAULT_QC_THRESHOLDS, Threshold, load_config
from dicom_node.qa.flags import qc_flags
from dicom_node.restore.gat import gat_forward
from dicom_node.restore.gat_bm3d import GatBm3dRestorer
from dicom_node.restore.mask import breast_mask
from dicom_node.restore.noise import NoiseModel
from dicom_node.restore.qc import calibration_check, image_qc, restoration_qc
from dicom_node.sim.acquisition import acquire, crosstalk_kernel
from dicom_node.sim.phantom import make_phantom

DETECTORS = {"D": NoiseModel(0.09, 2.5, 45.0), "E": NoiseModel(0.2, 5.0, 110.0)}
SEEDS = (7101, 7102)


def with_gain(noise: NoiseModel, factor: float) -> NoiseModel:
    return NoiseModel(noise.gain * factor, noise.electronic_noise, noise.offset, noise.kernel)


@pytest.fixture(scope="module")
def acquisitions():
    """(detector, seed, dose) → (raw low-dose image, breast mask, noise model): 832×672 at 0.1 mm."""
    images = {}
    for name, noise in DETECTORS.items():
        for seed in SEEDS:
            phantom = make_phantom((832, 672), seed=seed, pixel_spacing_mm=0.1)
            for dose in (0.5, 0.25):
                raw = acquire(phantom.signal, noise, dose, seed + 50).astype(np.float64)
                images[name, seed, dose] = raw, breast_mask(raw, noise), noise
    return images


def test_calibration_reads_one_when_the_calibration_holds(acquisitions):
    readings = {key: calibration_check(raw, noise, mask) for key, (raw, mask, noise) in acquisitions.items()}
    for key, figures in readings.items():
        print(key, {name: round(value, 3) for name, value in figures.items()})
        assert figures["calibration_noise_std"] == pytest.approx(1.0, abs=0.05), key
        assert figures["calibration_gain_ratio"] == pytest.approx(1.0, abs=0.05), key
        assert not qc_flags(figures, DEFAULT_QC_THRESHOLDS), key


@pytest.mark.parametrize("factor", [0.8, 1.2], ids=["lambda-20pc-low", "lambda-20pc-high"])
def test_calibration_moves_and_is_flagged_when_lambda_is_off_by_20_percent(acquisitions, factor):
    for key, (raw, mask, noise) in acquisitions.items():
        right = calibration_check(raw, noise, mask)["calibration_gain_ratio"]
        wrong = calibration_check(raw, with_gain(noise, factor), mask)
        move = wrong["calibration_gain_ratio"] / right - 1
        print(key, factor, f"gain ratio {right:.3f} → {wrong['calibration_gain_ratio']:.3f} ({move:+.1%})")
        assert abs(move) >= 0.10, key
        assert np.sign(move) == np.sign(1 - factor)  # a λ configured too low makes the noise look too high
        [flag] = qc_flags(wrong, DEFAULT_QC_THRESHOLDS)
        assert flag["figure"] == "calibration_gain_ratio"
        assert ("above its maximum" if factor < 1 else "below its minimum") in flag["message"]


def test_calibration_takes_the_noise_spectrum_of_a_correlated_detector():
    """A CsI-like detector (3×3 crosstalk): told its kernel κ, the figure reads 1; assuming white
    noise it reads far below (the crosstalk moves noise power to low frequencies)."""
    from dicom_node.sim.acquisition import noise_kernel

    kernel = noise_kernel(crosstalk_kernel(0.3))
    white = NoiseModel(0.12, 3.0, 60.0)
    coloured = NoiseModel(0.12, 3.0, 60.0, kernel)
    phantom = make_phantom((832, 672), seed=7111, pixel_spacing_mm=0.1)
    raw = acquire(phantom.signal, white, 0.5, 7112, crosstalk=0.3).astype(np.float64)
    mask = breast_mask(raw, white)
    told = calibration_check(raw, coloured, mask)["calibration_gain_ratio"]
    assumed_white = calibration_check(raw, white, mask)["calibration_gain_ratio"]
    print(f"coloured {told:.3f}, assumed white {assumed_white:.3f}")
    assert told == pytest.approx(1.0, abs=0.07)
    assert assumed_white < 0.85


def test_too_small_a_breast_gives_no_calibration_figure_rather_than_a_rough_one():
    noise = DETECTORS["D"]
    raw = acquire(make_phantom((128, 96), seed=7120).signal, noise, 0.5, 7121).astype(np.float64)
    figures = calibration_check(raw, noise, breast_mask(raw, noise))
    assert math.isnan(figures["calibration_noise_std"]) and not qc_flags(figures, DEFAULT_QC_THRESHOLDS)


@pytest.fixture(scope="module")
def restored_pair():
    """Two low-dose realisations of one unseen phantom, restored by gat-bm3d (plain blend), and
    the true noise of the output measured across them (GAT domain, full-dose scale)."""
    noise = NoiseModel(0.15, 3.5, 70.0)
    phantom = make_phantom((704, 576), seed=7130, pixel_spacing_mm=0.085)
    raws = [acquire(phantom.signal, noise, 0.5, 7131 + i).astype(np.float64) for i in range(2)]
    mask = breast_mask(raws[0], noise)
    restorer = GatBm3dRestorer(blend="plain")
    outputs = [restorer.restore(raw, noise, 0.5).image for raw in raws]
    difference = gat_forward(outputs[0], noise) - gat_forward(outputs[1], noise)
    true_noise = float(np.sqrt(np.mean(difference[mask] ** 2) / 2))
    return noise, raws, outputs, mask, true_noise


def test_a_restoration_that_only_removes_noise_is_in_range(restored_pair):
    noise, raws, outputs, mask, true_noise = restored_pair
    figures = restoration_qc(raws[0], outputs[0], noise, 0.5, mask)
    print({name: round(value, 3) for name, value in figures.items()}, f"true noise after {true_noise:.3f}")
    # before: the rescaled input's noise relative to full dose, as the noise model predicts it
    signal = np.mean(raws[0][mask] - noise.offset) / 0.5
    expected = math.sqrt(
        (noise.gain * signal / 0.5 + (noise.electronic_noise / 0.5) ** 2)
        / (noise.gain * signal + noise.electronic_noise**2)
    )
    assert figures["noise_before"] == pytest.approx(expected, rel=0.05)
    # after: within 12 % of the noise measured across realisations, below the input's
    assert figures["noise_after"] == pytest.approx(true_noise, rel=0.12)
    assert figures["noise_after"] < figures["noise_before"]
    assert figures["snr_after"] > figures["snr_before"]
    assert abs(figures["method_noise_structure"]) < 0.1
    assert not qc_flags(figures, DEFAULT_QC_THRESHOLDS)


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_an_over_smoothing_restorer_leaves_structure_in_its_method_noise_and_is_flagged(restored_pair, sigma):
    noise, raws, _, mask, _ = restored_pair
    rescaled = (raws[0] - noise.offset) / 0.5 + noise.offset
    blurred = ndimage.gaussian_filter(rescaled, sigma)
    figures = restoration_qc(raws[0], blurred, noise, 0.5, mask)
    print(sigma, {name: round(value, 3) for name, value in figures.items()})
    assert figures["method_noise_structure"] > 0.2
    flagged = {flag["figure"] for flag in qc_flags(figures, DEFAULT_QC_THRESHOLDS)}
    assert "method_noise_structure" in flagged


def test_image_qc_adds_the_breast_area_and_the_saturated_fraction():
    noise = DETECTORS["E"]
    phantom = make_phantom((640, 512), seed=7140, pixel_spacing_mm=0.1)
    raw = acquire(phantom.signal, noise, 0.5, 7141).astype(np.float64)
    mask = breast_mask(raw, noise)
    top = float(np.max(raw[mask]))
    figures = image_qc(raw, raw, noise, 1.0, saturation=top, pixel_area_mm2=0.01)
    assert figures["breast_area_cm2"] == pytest.approx(np.count_nonzero(mask) * 0.01 / 100)
    assert figures["saturated_fraction"] == pytest.approx(np.mean(raw[mask] >= top))
    figures = image_qc(raw, raw, noise, 1.0)
    assert math.isnan(figures["breast_area_cm2"]) and math.isnan(figures["saturated_fraction"])


def test_snr_is_the_mean_over_15_px_boxes_of_mean_over_std():
    rng = np.random.default_rng(7150)
    image = 400.0 + rng.normal(0.0, 20.0, (400, 400))
    figures = restoration_qc(image, image / 2, NoiseModel(1.0, 0.0, 0.0), 1.0, np.ones(image.shape, dtype=bool))
    assert figures["snr_before"] == pytest.approx(20.0, rel=0.03)  # 400 / 20, a box's std slightly below 20
    assert figures["snr_after"] == pytest.approx(figures["snr_before"], rel=1e-9)  # scaling keeps the SNR


def test_flags_say_which_figure_and_by_how_much_and_skip_what_was_not_measured():
    thresholds = {"a": Threshold(min=0.9, max=1.1), "b": Threshold(max=0.1), "c": Threshold(min=0.5), "d": Threshold()}
    flags = qc_flags({"a": 1.25, "b": 0.05, "c": float("nan"), "d": 99.0}, thresholds)
    assert flags == [
        {"figure": "a", "value": 1.25, "min": 0.9, "max": 1.1, "message": "a 1.25 above its maximum 1.1 by 0.15 (14%)"}
    ]
    assert qc_flags({"a": 0.8}, thresholds)[0]["message"] == "a 0.8 below its minimum 0.9 by 0.1 (11%)"


def test_configured_thresholds_replace_the_defaults_figure_by_figure(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text("[qc.thresholds.noise_after]\nmax = 1.5\n[qc.thresholds.mean_ratio]\n")
    thresholds = load_config(path).qc.effective_thresholds
    assert thresholds["noise_after"] == Threshold(max=1.5)
    assert thresholds["mean_ratio"] == Threshold()  # an empty table: not checked
    assert thresholds["calibration_gain_ratio"] == DEFAULT_QC_THRESHOLDS["calibration_gain_ratio"]
    path.write_text("[qc.thresholds.noise_after]\nmin = 2\nmax = 1\n")
    with pytest.raises(Exception, match=r"qc\.thresholds\.noise_after: min 2 is above max 1"):
        load_config(path)


def worker_for(tmp_path: Path, profile_lines: str):
    """A worker on a fresh job log, its configuration the embedded defaults' detector, one profile."""
    from dicom_node.joblog import JobLog
    from dicom_node.pipeline.worker import Worker

    config_path = tmp_path / "node.toml"
    config_path.write_text(
        f"""
[node]
data_dir = "data"
[[destinations]]
name = "outbox"
folder = "data/outbox"
[profiles.p]
dose_fraction = 0.5
blend = "plain"
destinations = ["outbox"]
{profile_lines}
[detectors.SIM-0001]
gain = 0.1
electronic_noise = 3.0
offset = 50.0
"""
    )
    config = load_config(config_path)
    joblog = JobLog(config.database_url)
    return config, joblog, Worker(config, joblog, "test-worker")


def queue_image(tmp_path: Path, joblog) -> int:
    from dicomtools import low_dose_mammogram

    path = low_dose_mammogram(tmp_path / "in.dcm", seed=7160, shape=(384, 320))
    return joblog.record_received(
        sop_instance_uid="1.2.826.0.1.3680043.8.498.7160",
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2.1",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        calling_ae="MAMMO",
        called_ae="DOSENODE",
        peer_host="127.0.0.1",
        station_name="MG1",
        detector_serial="SIM-0001",
        profile="p",
        input_path=str(path),
        input_sha256="0" * 64,
        input_bytes=path.stat().st_size,
    )


@pytest.mark.parametrize("hold", [False, True], ids=["flag-only", "hold-flagged"])
def test_the_worker_stores_figures_flags_and_thumbnails_and_holds_only_when_the_profile_says(tmp_path, hold):
    from dicom_node.imaging.thumbnails import THUMBNAIL_KINDS, thumbnail_dir

    # a threshold this restoration cannot meet, so the job is flagged
    config, joblog, worker = worker_for(
        tmp_path, f"hold_flagged = {str(hold).lower()}\n[qc.thresholds.mean_ratio]\nmax = 0.5\n"
    )
    job_id = queue_image(tmp_path, joblog)
    assert worker.run_once()
    job = joblog.get_job(job_id)
    assert job is not None and job.qc is not None
    assert {
        "calibration_gain_ratio",
        "noise_after",
        "method_noise_structure",
        "snr_after",
        "mean_ratio",
    } <= job.qc.keys()
    assert job.qc_flags is not None and [f["figure"] for f in job.qc_flags] == ["mean_ratio"]
    assert "mean_ratio" in [e.detail for e in joblog.events(job_id) if e.kind == "qc-flagged"][0]
    for kind in THUMBNAIL_KINDS:
        assert (thumbnail_dir(config.data_dir, job_id) / f"{kind}.png").stat().st_size > 100
    statuses = {d.status for d in joblog.deliveries(job_id)}
    if hold:
        assert job.status == "held" and statuses == {"held"}
        assert joblog.release(job_id, actor="test")
        assert joblog.get_job(job_id).status == "forwarding"
        assert {d.status for d in joblog.deliveries(job_id)} == {"pending"}
        assert not joblog.release(job_id, actor="test")  # nothing held any more
    else:
        assert job.status == "forwarding" and statuses == {"pending"}


def test_flagged_jobs_are_listed_by_jobs_flagged_and_released_by_the_release_command(tmp_path, capsys):
    from dicom_node.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as info:
            main([*args, "--config", str(tmp_path / "node.toml")])
        out, err = capsys.readouterr()
        return int(info.value.code or 0), out, err

    _, joblog, worker = worker_for(tmp_path, "hold_flagged = true\n[qc.thresholds.mean_ratio]\nmax = 0.5\n")
    job_id = queue_image(tmp_path, joblog)
    assert worker.run_once()
    code, out, _ = run("jobs", "--flagged")
    assert code == 0 and f"{job_id:>6}" in out and "held" in out and "QC: mean_ratio" in out
    code, out, err = run("jobs", "--not-flagged")
    assert code == 0 and "no jobs" in err
    code, out, _ = run("jobs", "show", str(job_id))
    assert "QC flag    mean_ratio" in out
    code, out, _ = run("release", str(job_id))
    assert code == 0 and "released: 1 held sends queued" in out
    code, _, err = run("release", str(job_id))
    assert code == 1 and "not held: nothing to release" in err
