"""The acquisition simulator's statistics match the noise model: mean γY + τ, var γλY + σ_e²."""

import numpy as np
import pytest

from dicom_node.restore.noise import NoiseModel
from dicom_node.sim.acquisition import acquire, crosstalk_kernel

BAD_DOSE_FRACTIONS = [
    pytest.param(0.0, id="zero"),
    pytest.param(-0.5, id="negative"),
    pytest.param(1.5, id="above-one"),
]


@pytest.mark.parametrize("dose", [1.0, 0.5, 0.2])
@pytest.mark.parametrize("level", [20.0, 400.0, 5000.0])
def test_mean_and_variance_follow_the_model(dose, level, sim_noise):
    raw = acquire(np.full((400, 400), level), sim_noise, dose, rng_or_seed=1).astype(float)
    mean_expected = dose * level + sim_noise.offset
    var_expected = sim_noise.gain * dose * level + sim_noise.electronic_noise**2 + 1 / 12  # + rounding
    print(
        f"level {level} dose {dose}: mean {raw.mean():.2f}/{mean_expected:.2f} var {raw.var():.2f}/{var_expected:.2f}"
    )
    assert raw.mean() == pytest.approx(mean_expected, abs=4 * np.sqrt(var_expected / raw.size) + 0.05)
    assert raw.var() == pytest.approx(var_expected, rel=0.03)


def test_per_pixel_gain_map():
    gain = np.where(np.arange(200)[None, :] < 100, 0.05, 0.3) * np.ones((400, 1))
    raw = acquire(np.full((400, 200), 1000.0), NoiseModel(gain, 2.0, 40.0), 1.0, rng_or_seed=2).astype(float)
    low, high = raw[:, :100].var(), raw[:, 100:].var()
    print(f"variance with λ=0.05: {low:.1f}, λ=0.3: {high:.1f}")
    assert low == pytest.approx(0.05 * 1000 + 4, rel=0.05)
    assert high == pytest.approx(0.3 * 1000 + 4, rel=0.05)


def neighbour_correlation(image: np.ndarray) -> float:
    x = image - image.mean()
    return float(np.mean(x[:, 1:] * x[:, :-1]) / np.mean(x * x))


def test_crosstalk_correlates_noise_without_changing_its_variance(sim_noise):
    signal = np.full((500, 500), 2000.0)
    white = acquire(signal, sim_noise, 1.0, rng_or_seed=3).astype(float)
    correlated = acquire(signal, sim_noise, 1.0, rng_or_seed=3, crosstalk=0.5).astype(float)
    print(
        f"var white {white.var():.1f} crosstalk {correlated.var():.1f}; "
        f"neighbour correlation {neighbour_correlation(white):.3f} / {neighbour_correlation(correlated):.3f}"
    )
    assert np.sum(crosstalk_kernel(0.5) ** 2) == pytest.approx(1.0)
    assert correlated.var() == pytest.approx(white.var(), rel=0.05)
    assert abs(neighbour_correlation(white)) < 0.02
    # Expected: the kernel's own lag-1 autocorrelation, diluted by the white electronic noise.
    kernel = crosstalk_kernel(0.5)
    quantum_share = sim_noise.gain * 2000 / (sim_noise.gain * 2000 + sim_noise.electronic_noise**2 + 1 / 12)
    expected = np.sum(kernel[:, 1:] * kernel[:, :-1]) * quantum_share
    print(f"expected neighbour correlation with crosstalk {expected:.3f}")
    assert neighbour_correlation(correlated) == pytest.approx(expected, abs=0.02)


def test_clipped_to_stored_bits_and_deterministic_per_seed(sim_noise):
    signal = np.array([[0.0, 100.0, 20000.0]])
    raw = acquire(signal, sim_noise, 1.0, rng_or_seed=4)
    assert raw.dtype == np.uint16 and raw.max() == 2**14 - 1
    assert np.array_equal(acquire(signal, sim_noise, 1.0, rng_or_seed=4), raw)
    image = np.full((64, 64), 500.0)
    assert not np.array_equal(
        acquire(image, sim_noise, 1.0, rng_or_seed=5), acquire(image, sim_noise, 1.0, rng_or_seed=6)
    )


@pytest.mark.parametrize("dose_fraction", BAD_DOSE_FRACTIONS)
def test_rejects_bad_dose_fraction(dose_fraction, sim_noise):
    with pytest.raises(ValueError, match="dose fraction"):
        acquire(np.array([[0.0, 100.0, 20000.0]]), sim_noise, dose_fraction)
