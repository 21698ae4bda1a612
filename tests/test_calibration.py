"""Noise-model calibration from simulated flat fields, and the single-image QC estimate."""

import numpy as np
import pytest
from scipy import ndimage

from dicom_node.errors import InputRefused
from dicom_node.restore.calibration import calibrate_flat_fields, estimate_noise_from_image

OFFSET, SIGMA_E, SIZE = 50.0, 3.0, 192
EXPOSURES = [0.05, 0.2, 1.0, 4.0]  # relative dose; 1.0 ≈ 1000 ADU in the centre


def truth(rng):
    rows, cols = np.meshgrid(np.linspace(-1, 1, SIZE), np.linspace(-1, 1, SIZE), indexing="ij")
    gain_map = 0.1 * (1 + 0.15 * cols + 0.1 * rows**2)
    heel = 1 - 0.25 * (rows + 1) / 2  # the anode heel effect: 25 % less signal on one side
    pixel_gain = 1 + 0.01 * rng.normal(size=(SIZE, SIZE))  # 1 % fixed pattern
    return gain_map, heel, pixel_gain


def flat_field(exposure, gain_map, heel, pixel_gain, rng):
    signal = 1000 * exposure * heel * pixel_gain
    return gain_map * rng.poisson(signal / gain_map) + rng.normal(0, SIGMA_E, signal.shape) + OFFSET


def report(calibration, gain_map):
    centre = gain_map[SIZE // 4 : 3 * SIZE // 4, SIZE // 4 : 3 * SIZE // 4].mean()
    map_error = np.abs(calibration.gain_map / gain_map - 1).max()
    print(
        f"τ {calibration.offset:.2f}, λ {calibration.gain:.4f} (centre truth {centre:.4f}), "
        f"σ_e {calibration.electronic_noise:.3f}, map max error {map_error:.2%}, "
        f"r² {calibration.offset_fit_r2:.6f}/{calibration.variance_fit_r2:.5f}"
    )
    return centre, map_error


def test_recovers_noise_model_from_repeated_flat_fields():
    rng = np.random.default_rng(11)
    gain_map, heel, pixel_gain = truth(rng)
    exposures = [e for e in EXPOSURES for _ in range(2)]
    calibration = calibrate_flat_fields([flat_field(e, gain_map, heel, pixel_gain, rng) for e in exposures], exposures)
    centre, map_error = report(calibration, gain_map)
    assert abs(calibration.offset - OFFSET) < 0.5
    assert abs(calibration.gain / centre - 1) < 0.03
    assert abs(calibration.electronic_noise - SIGMA_E) < 0.3
    assert map_error < 0.05 and not calibration.electronic_noise_clamped
    assert calibration.noise_model().gain.shape == (SIZE, SIZE)


def test_single_flat_fields_without_fixed_pattern():
    rng = np.random.default_rng(12)
    gain_map, heel, _ = truth(rng)
    calibration = calibrate_flat_fields([flat_field(e, gain_map, heel, 1.0, rng) for e in EXPOSURES], EXPOSURES)
    centre, map_error = report(calibration, gain_map)
    assert abs(calibration.gain / centre - 1) < 0.03
    assert abs(calibration.electronic_noise - SIGMA_E) < 0.4
    assert map_error < 0.05


def test_without_detrending_the_heel_effect_would_inflate_the_variance():
    """The check that detrending matters: the raw ROI variance includes the heel gradient."""
    rng = np.random.default_rng(13)
    gain_map, heel, _ = truth(rng)
    image = flat_field(4.0, gain_map, heel, 1.0, rng)
    calibration = calibrate_flat_fields([image, flat_field(1.0, gain_map, heel, 1.0, rng)], [4.0, 1.0])
    roi = image[SIZE // 4 : 3 * SIZE // 4, SIZE // 4 : 3 * SIZE // 4]
    print(f"ROI variance raw {roi.var():.0f} vs detrended {calibration.variances[-1]:.0f}")
    assert roi.var() > 2 * calibration.variances[-1]


def test_single_image_estimate_on_textured_image():
    rng = np.random.default_rng(14)
    texture = ndimage.gaussian_filter(rng.normal(size=(256, 256)), 4)
    rows = np.linspace(0, 1, 256)[:, None]
    signal = (300 + 2500 * rows) * (1 + 3 * texture)  # thickness ramp and tissue texture
    gain = 0.1
    image = gain * rng.poisson(np.maximum(signal, 0) / gain) + rng.normal(0, SIGMA_E, signal.shape) + OFFSET
    estimated_gain, electronic_variance = estimate_noise_from_image(image, OFFSET)
    fixed_gain, _ = estimate_noise_from_image(image, OFFSET, electronic_variance=SIGMA_E**2)
    print(f"single image: λ {estimated_gain:.4f} (σ_e² {electronic_variance:.1f}), with σ_e² known {fixed_gain:.4f}")
    assert abs(estimated_gain / gain - 1) < 0.15
    assert abs(fixed_gain / gain - 1) < 0.1


FLAT = np.full((64, 64), 100.0)
_RNG = np.random.default_rng(0)


@pytest.mark.parametrize(
    ("images", "exposures", "match"),
    [
        pytest.param([FLAT, FLAT + 1], [1.0, 1.0], "2 or more distinct exposures", id="one-exposure"),
        pytest.param([FLAT, np.full((32, 32), 200.0)], [1.0, 2.0], "same shape", id="shapes-differ"),
        pytest.param([FLAT, FLAT], [1.0, 2.0, 3.0], "2 images but 3 exposures", id="more-exposures-than-images"),
        pytest.param([FLAT, np.full((64, 64), np.nan)], [1.0, 2.0], "finite", id="nan-pixels"),
        pytest.param(
            [FLAT + _RNG.normal(0, 5, FLAT.shape), FLAT + 100 + _RNG.normal(0, 3, FLAT.shape)],
            [1.0, 2.0],
            "does not grow",
            id="more-signal-less-noise",
        ),
        pytest.param([FLAT, FLAT + 100], [1.0, 2.0], "no noise", id="noise-free"),
    ],
)
def test_error_messages(images, exposures, match):
    with pytest.raises(InputRefused, match=match):
        calibrate_flat_fields(images, exposures)
