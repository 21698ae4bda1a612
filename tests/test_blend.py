"""The spectral blend: least-bias weights per frequency that meet the full-dose variance."""

import numpy as np
import pytest
from scipy import ndimage

from dicom_node.restore.blend import SpectralStatistics, blend, probe_responses, spectral_blend
from dicom_node.restore.gat import gat_forward, gat_inverse
from dicom_node.restore.noise import NoiseModel


def known_statistics(shape=(64, 48), seed=3) -> SpectralStatistics:
    """Spectra shaped like a denoiser's: leftover noise low-frequency, removed structure high."""
    rng = np.random.default_rng(seed)
    ky, kx = np.meshgrid(np.fft.fftfreq(shape[0]), np.fft.fftfreq(shape[1]), indexing="ij")
    radius = np.hypot(ky, kx) / np.hypot(0.5, 0.5)
    noise = np.ones(shape)
    gain = np.exp(-8 * radius**2)  # a linear low-pass H: ε = H n, so v = H²N and c = H·N
    bias = 0.02 * radius * (1 + rng.uniform(0, 1, shape))
    return SpectralStatistics(noise=noise, estimate=gain**2 * noise, covariance=gain * noise, bias=bias)


@pytest.mark.parametrize("target", [0.5, 0.35, 0.25])
def test_weights_meet_the_target_variance_exactly(target):
    statistics = known_statistics()
    alpha = statistics.weights_for_variance(target)
    assert statistics.variance(alpha) == pytest.approx(target, rel=1e-6)
    assert np.all((alpha >= 0) & (alpha <= 1))


def test_weights_are_the_least_bias_at_that_variance():
    """Against one weight for every frequency (the per-pixel blend's choice) at equal variance."""
    statistics = known_statistics()
    target = 0.5
    alpha = statistics.weights_for_variance(target)
    low, high = 0.0, 1.0  # a single α: the variance rises with α above the least-variance mix
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if statistics.variance(np.full_like(alpha, middle)) < target else (low, middle)
    single = np.full_like(alpha, high)
    assert statistics.variance(single) == pytest.approx(target, rel=1e-6)
    print(f"bias power: spectral {statistics.bias_power(alpha):.5f}, one weight {statistics.bias_power(single):.5f}")
    assert statistics.bias_power(alpha) < statistics.bias_power(single)


def test_an_unreachable_target_gets_the_least_variance_mix():
    statistics = known_statistics()
    least = statistics.weights(1e12)
    alpha = statistics.weights_for_variance(0.01)  # far below what any mix of these two reaches
    np.testing.assert_allclose(alpha, least, atol=1e-6)
    assert statistics.variance(alpha) > 0.01


NOISE = NoiseModel(gain=0.1, electronic_noise=3.0, offset=50.0)


class LowPass:
    """A weak linear GAT-domain denoiser (it keeps a fifth of the input, noise included), whose
    noise statistics the blend must find by its probes."""

    name = "low-pass"

    def __call__(self, image, sigma, kernel=None):
        return 0.2 * image + 0.8 * ndimage.gaussian_filter(image, 1.5, mode="wrap")


def test_spectral_blend_reaches_full_dose_noise_and_keeps_the_mean():
    """Monte Carlo: a flat-ish textured signal, half dose, a linear denoiser with leftover noise.
    The plain blend (noise-free assumption) stays above full-dose noise; the spectral blend meets it."""
    rng = np.random.default_rng(11)
    rows, cols = np.mgrid[0:96, 0:80]
    signal = 2000 + 300 * np.sin(rows / 3.0) * np.cos(cols / 4.0)
    r, denoiser = 0.5, LowPass()
    mask = np.ones(signal.shape, bool)
    full_noise = np.sqrt(NOISE.variance(signal))
    spectral, plain = [], []
    for _ in range(24):
        low = NOISE.gain * rng.poisson(r * signal / NOISE.gain) + rng.normal(0, 3.0, signal.shape) + NOISE.offset
        gat_image = gat_forward(low, NOISE)
        gat_estimate = denoiser(gat_image, 1.0)
        estimate = gat_inverse(gat_estimate, NOISE)
        probes = probe_responses(denoiser, gat_image, 1, seed=int(rng.integers(1 << 30)))
        result = spectral_blend(low, estimate, NOISE, r, probes, mask)
        spectral.append(result.image - NOISE.offset)
        plain.append(blend(low, estimate, NOISE, r) - NOISE.offset)
    spectral_ratio = np.mean(np.std(spectral, axis=0, ddof=1) / full_noise)
    plain_ratio = np.mean(np.std(plain, axis=0, ddof=1) / full_noise)
    print(
        f"noise / full-dose noise: spectral {spectral_ratio:.3f} (predicted {result.predicted_noise_ratio:.3f}), "
        f"plain {plain_ratio:.3f}"
    )
    assert plain_ratio > 1.08
    assert spectral_ratio == pytest.approx(1.0, abs=0.05)
    assert result.predicted_noise_ratio == pytest.approx(1.0, abs=0.02)
    assert np.mean(spectral) / np.mean(signal) == pytest.approx(1.0, abs=0.005)
