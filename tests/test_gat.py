"""GAT: unit noise std after the forward transform, and an unbiased inverse at low counts."""

import numpy as np
import pytest

from dicom_node.restore.gat import gat_forward, gat_inverse
from dicom_node.restore.noise import NoiseModel

OFFSET = 50.0
SAMPLES = 200_000


def poisson_gaussian(counts: float, gain: float | np.ndarray, sigma_e: float, size, rng) -> np.ndarray:
    """z = λ·Poisson(y/λ) + N(0, σ_e²) + τ with y = counts·λ."""
    return gain * rng.poisson(counts, size=size) + rng.normal(0.0, sigma_e, size=size) + OFFSET


@pytest.mark.parametrize("gain, sigma_e", [(1.0, 0.0), (1.0, 0.5), (0.1, 3.0), (2.0, 1.0)])
@pytest.mark.parametrize("counts", [5, 30, 1000])
def test_forward_stabilises_variance_to_one(gain, sigma_e, counts):
    rng = np.random.default_rng(1)
    z = poisson_gaussian(counts, gain, sigma_e, SAMPLES, rng)
    std = gat_forward(z, NoiseModel(gain, sigma_e, OFFSET)).std()
    print(f"λ={gain} σ_e={sigma_e} counts={counts}: GAT std {std:.4f}")
    assert abs(std - 1.0) < 0.02


def test_forward_with_gain_map():
    rng = np.random.default_rng(2)
    gain_map = np.linspace(0.05, 0.2, 64)[None, :] * np.ones((64, 1))
    noise = NoiseModel(gain_map, 1.0, OFFSET)
    counts = rng.uniform(500, 5000, size=(64, 64))
    realisations = gain_map * rng.poisson(counts, size=(400, 64, 64)) + rng.normal(0, 1.0, (400, 64, 64)) + OFFSET
    per_pixel_std = gat_forward(realisations, noise).std(axis=0)
    print(f"gain map: GAT std per pixel mean {per_pixel_std.mean():.4f}, range {np.ptp(per_pixel_std):.3f}")
    assert abs(per_pixel_std.mean() - 1.0) < 0.01
    # A scalar λ (the map's mean) would not stabilise: the ends of the map would stay off.
    wrong = gat_forward(realisations, NoiseModel(float(gain_map.mean()), 1.0, OFFSET)).std(axis=0)
    assert abs(wrong[:, :8].mean() - 1.0) > 0.1 and abs(per_pixel_std[:, :8].mean() - 1.0) < 0.02


LOW_COUNT_CASES = [(g, s, c) for g, s in [(1.0, 0.0), (1.0, 0.5), (2.0, 1.0)] for c in (2, 3, 5, 20, 200)]
# Mammography-like: σ_e/λ = 30 counts of electronic noise; the signal is on top of it.
DETECTOR_CASES = [(0.1, 3.0, c) for c in (20, 200, 2000)]


@pytest.mark.parametrize("gain, sigma_e, counts", LOW_COUNT_CASES + DETECTOR_CASES)
def test_inverse_is_unbiased_where_naive_inverse_is_not(gain, sigma_e, counts):
    rng = np.random.default_rng(3)
    noise = NoiseModel(gain, sigma_e, OFFSET)
    signal = counts * gain
    transformed = gat_forward(poisson_gaussian(counts, gain, sigma_e, SAMPLES, rng), noise)
    mean_gat = transformed.mean()
    unbiased = (gat_inverse(mean_gat, noise) - OFFSET) / signal - 1
    naive = gain * (mean_gat**2 / 4 - 3 / 8 - (sigma_e / gain) ** 2) / signal - 1
    # Sampling error of the relative bias: d(raw)/dD ≈ λ·D/2 times the standard error of the mean.
    standard_error = gain * mean_gat / 2 * transformed.std() / np.sqrt(SAMPLES) / signal
    print(
        f"λ={gain} σ_e={sigma_e} counts={counts}: relative bias unbiased {unbiased:+.4f}, "
        f"naive {naive:+.4f} (sampling error {standard_error:.4f})"
    )
    assert abs(unbiased) < 0.01 + 3 * standard_error
    if counts <= 5:
        assert naive < -0.03 - 3 * standard_error  # the test can tell the two inverses apart


def test_inverse_with_gain_map_returns_raw_values():
    gain_map = np.array([[0.05, 0.1], [0.2, 0.4]])
    noise = NoiseModel(gain_map, 3.0, OFFSET)
    raw = np.array([[500.0, 800.0], [1200.0, 5000.0]])
    # Far from zero counts the inverse of the forward transform is the identity up to ~1/D².
    recovered = gat_inverse(gat_forward(raw, noise), noise)
    assert np.allclose(recovered, raw + gain_map / 8, rtol=1e-3)


def test_inverse_clamps_small_and_negative_values_to_the_offset():
    noise = NoiseModel(1.0, 0.0, OFFSET)
    values = gat_inverse(np.array([-5.0, 0.0, 0.5, 1.0]), noise)
    assert np.all(np.isfinite(values)) and np.all(values == OFFSET)
