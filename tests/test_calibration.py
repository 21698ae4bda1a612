"""Noise-model calibration from simulated flat fields, and the single-image QC estimates."""

import numpy as np
import pytest
from scipy import ndimage

from dicom_node.errors import InputRefused
from dicom_node.restore.calibration import (
    calibrate_flat_fields,
    check_noise_correlation,
    estimate_noise_from_image,
    kernel_from_correlation,
    kernel_neighbour_correlations,
)
from dicom_node.restore.noise import NoiseModel

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


def gaussian_kernel(sigma, radius=3):
    """A unit-energy Gaussian kernel: the quantum noise's correlation on a CsI-like detector."""
    r = np.arange(-radius, radius + 1)
    k = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma**2))
    return k / np.sqrt(np.sum(k**2))


def gat_domain_kernel(quantum_kernel, quantum_fraction, side, grid=64):
    """The GAT-domain κ of quantum noise correlated by K plus white electronic noise.

    The GAT divides the raw noise √(λy)·(n ⊛ K) + σ_e·n₂ by √(λy + σ_e²), so the GAT-domain
    spectrum is α·|K̂|² + (1 − α), α = λy/(λy + σ_e²); κ is the inverse FFT of its square root,
    cropped to `side` and renormalised (as the calibration stores it).
    """
    radius = quantum_kernel.shape[0] // 2
    padded = np.zeros((grid, grid))
    padded[: quantum_kernel.shape[0], : quantum_kernel.shape[1]] = quantum_kernel
    padded = np.roll(padded, (-radius, -radius), axis=(0, 1))
    spectrum = quantum_fraction * np.abs(np.fft.fft2(padded)) ** 2 + 1 - quantum_fraction
    full = np.fft.fftshift(np.real(np.fft.ifft2(np.sqrt(spectrum))))
    centre, half = grid // 2, side // 2
    kernel = full[centre - half : centre + half + 1, centre - half : centre + half + 1]
    return kernel / np.sqrt(np.sum(kernel**2)), float(np.sum(kernel**2))


def correlated_flat_fields(kernel, exposures, size, rng):
    """Flat fields whose Poisson quantum noise is convolved with `kernel` (electronic noise stays white)."""
    rows, cols = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    gain_map = 0.1 * (1 + 0.15 * cols + 0.1 * rows**2)
    heel = 1 - 0.25 * (rows + 1) / 2
    pixel_gain = 1 + 0.01 * rng.normal(size=(size, size))
    images = []
    for exposure in exposures:
        signal = 1000 * exposure * heel * pixel_gain
        quantum = gain_map * rng.poisson(signal / gain_map) - signal
        if kernel is not None:
            quantum = ndimage.convolve(quantum, kernel, mode="reflect")
        images.append(signal + quantum + rng.normal(0, SIGMA_E, signal.shape) + OFFSET)
    centre = gain_map[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4].mean()
    return images, centre, heel


def test_spectrum_recovers_a_known_noise_kernel():
    """Quantum noise correlated by a Gaussian of σ 0.7 px: the GAT-domain κ and λ are recovered.

    At the exposures κ comes from (2000 and 4000 ADU at the centre) quantum noise dominates
    (α ≈ 0.95–0.98), and κ is compared with the exact GAT-domain kernel at their mean α. The
    tolerance, 0.01 on every tap, is about 2.5× the largest error over 20 seeds of this setup
    (mean 0.0023, max 0.0041): the taps' standard error from the 2 × 42 000 noise pixels is about
    0.002. The neighbour correlation must lie within 5 standard errors of α·(K ⋆ K)(1).
    """
    size, exposures = 256, [e for e in (0.25, 1.0, 2.0, 4.0) for _ in range(2)]
    quantum_kernel = gaussian_kernel(0.7)
    images, centre, heel = correlated_flat_fields(quantum_kernel, exposures, size, np.random.default_rng(21))
    calibration = calibrate_flat_fields(images, exposures)

    signal = np.array([1000 * e * heel[size // 10 : -size // 10].mean() for e in calibration.kernel_exposures])
    alpha = float(np.mean(centre * signal / (centre * signal + SIGMA_E**2)))
    kernel = calibration.noise_kernel
    assert kernel is not None
    expected, kept = gat_domain_kernel(quantum_kernel, alpha, kernel.shape[0])
    error = np.abs(kernel - expected).max()
    expected_correlation = alpha * kernel_neighbour_correlations(quantum_kernel)[0]
    print(
        f"κ {kernel.shape[0]}×{kernel.shape[1]} from {calibration.kernel_exposures} (α {alpha:.3f}): "
        f"max tap error {error:.4f}, centre {kernel[kernel.shape[0] // 2, kernel.shape[1] // 2]:.4f} "
        f"vs {expected[expected.shape[0] // 2, expected.shape[1] // 2]:.4f}, crop keeps {kept:.4f} of the energy; "
        f"neighbour correlation {calibration.neighbour_correlations} vs {expected_correlation:.4f} "
        f"± {calibration.neighbour_correlation_error:.4f}; λ {calibration.gain:.4f} vs {centre:.4f}, "
        f"variance corrections {np.round(calibration.variance_corrections, 4)}"
    )
    assert list(calibration.kernel_exposures) == [2.0, 4.0]  # the higher exposures
    assert abs(np.sum(kernel**2) - 1) < 1e-9 and kernel.shape[0] % 2 == 1
    assert kept >= 0.99  # the crop holds ≥ 99 % of the true kernel's energy
    assert error < 0.01
    for measured in calibration.neighbour_correlations:
        assert abs(measured - expected_correlation) < 5 * calibration.neighbour_correlation_error
    # Correlated noise loses more variance to the detrending; corrected, λ is still right.
    assert abs(calibration.gain / centre - 1) < 0.03
    assert np.all(calibration.variance_corrections > 1.03)
    assert np.array_equal(calibration.noise_model().kernel, kernel)


def test_white_noise_gives_no_kernel():
    size, exposures = 256, [e for e in (0.25, 1.0, 2.0, 4.0) for _ in range(2)]
    images, centre, _ = correlated_flat_fields(None, exposures, size, np.random.default_rng(22))
    calibration = calibrate_flat_fields(images, exposures)
    print(
        f"white: neighbour correlation {calibration.neighbour_correlations} "
        f"± {calibration.neighbour_correlation_error:.4f}, variance corrections "
        f"{np.round(calibration.variance_corrections, 4)}, λ {calibration.gain:.4f} vs {centre:.4f}"
    )
    assert calibration.noise_kernel is None and calibration.noise_model().kernel is None
    assert max(map(abs, calibration.neighbour_correlations)) < 4 * calibration.neighbour_correlation_error
    assert np.allclose(calibration.variance_corrections, 1, atol=0.01)
    assert abs(calibration.gain / centre - 1) < 0.03


def test_without_repeats_the_correlation_is_not_measured():
    rng = np.random.default_rng(23)
    gain_map, heel, _ = truth(rng)
    calibration = calibrate_flat_fields([flat_field(e, gain_map, heel, 1.0, rng) for e in EXPOSURES], EXPOSURES)
    assert calibration.noise_kernel is None and calibration.kernel_exposures is None
    assert np.isnan(calibration.neighbour_correlation) and calibration.variance_corrections is None


def test_kernel_from_correlation_of_a_known_kernel():
    """Without estimation noise the kernel comes back exactly (a symmetric kernel of positive spectrum)."""
    quantum_kernel = gaussian_kernel(1.0, radius=4)
    autocorrelation = ndimage.correlate(np.pad(quantum_kernel, 4), quantum_kernel, mode="constant")
    kernel = kernel_from_correlation(autocorrelation)
    expected, _ = gat_domain_kernel(quantum_kernel, 1.0, kernel.shape[0])
    print(f"σ 1 px: {kernel.shape[0]}×{kernel.shape[1]} kernel, max error {np.abs(kernel - expected).max():.2e}")
    assert kernel.shape == (5, 5)  # the smallest odd crop with ≥ 99 % of the energy (99.1 %)
    assert np.abs(kernel - expected).max() < 1e-9


def clinical_like_image(kernel, rng, shape=(768, 624)):
    """A raw image: a half-ellipse breast on the chest wall (left), direct exposure around it, heel effect."""
    rows, cols = np.indices(shape)
    breast = ((rows - shape[0] / 2) / (0.42 * shape[0])) ** 2 + (cols / (0.6 * shape[1])) ** 2 < 1
    texture = 1 + 4 * ndimage.gaussian_filter(rng.normal(size=shape), 6)
    signal = ndimage.gaussian_filter(np.where(breast, 900 * texture, 6000) * (1 - 0.2 * rows / shape[0]), 2)
    quantum = 0.1 * rng.poisson(np.maximum(signal, 0) / 0.1) - signal
    if kernel is not None:
        quantum = ndimage.convolve(quantum, kernel, mode="reflect")
    return np.rint(signal + quantum + rng.normal(0, SIGMA_E, shape) + OFFSET), signal


def test_single_image_check_of_the_noise_correlation():
    """The direct-exposure background of one image shows its noise correlation; it is compared with κ."""
    quantum_kernel = gaussian_kernel(0.7)
    image, _ = clinical_like_image(quantum_kernel, np.random.default_rng(31))
    alpha = 0.1 * 5400 / (0.1 * 5400 + SIGMA_E**2)  # the background's mean signal is about 5400 ADU
    kernel, _ = gat_domain_kernel(quantum_kernel, alpha, 5)
    right = check_noise_correlation(image, NoiseModel(0.1, SIGMA_E, OFFSET, kernel))
    white = check_noise_correlation(image, NoiseModel(0.1, SIGMA_E, OFFSET))
    print(f"correlated image, model κ: {right}\n  white model: difference {white.difference:.3f}")
    assert right.pixels > 100_000 and 5000 < right.background_signal < 6000
    assert right.agrees() and right.difference < 0.02
    assert not white.agrees() and white.expected == (0.0, 0.0)

    white_image, _ = clinical_like_image(None, np.random.default_rng(32))
    check = check_noise_correlation(white_image, NoiseModel(0.1, SIGMA_E, OFFSET))
    print(f"white image, white model: {check}")
    assert check.agrees() and check.difference < 4 * check.standard_error


def test_single_image_check_without_background_is_nan():
    rng = np.random.default_rng(33)
    signal = 900 * (1 + 4 * ndimage.gaussian_filter(rng.normal(size=(256, 256)), 6))  # the breast fills it
    image = 0.1 * rng.poisson(np.maximum(signal, 0) / 0.1) + rng.normal(0, SIGMA_E, signal.shape) + OFFSET
    check = check_noise_correlation(image, NoiseModel(0.1, SIGMA_E, OFFSET))
    print(check)
    assert np.isnan(check.measured).all() and np.isnan(check.difference) and not check.agrees()


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
