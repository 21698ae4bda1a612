"""The acquisition simulator's statistics match the noise model: mean γY + τ, var γλY + σ_e², and
the quantum noise's correlation is the kernel's (K ⋆ K) when the detector has one."""

import numpy as np
import pytest

from dicom_node.restore.noise import NoiseModel
from dicom_node.sim.acquisition import acquire, crosstalk_kernel, gaussian_kernel

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


def autocorrelation(image: np.ndarray, lags: int) -> np.ndarray:
    """Normalised autocorrelation of `image`'s fluctuations for lags −lags..lags on both axes."""
    x = image - image.mean()
    rows, cols = x.shape
    padded = np.fft.rfft2(x, s=(2 * rows, 2 * cols))  # zero-padded: linear, not circular
    full = np.fft.irfft2(np.abs(padded) ** 2, s=(2 * rows, 2 * cols))
    window = np.roll(full, (lags, lags), axis=(0, 1))[: 2 * lags + 1, : 2 * lags + 1]
    overlap = np.outer(rows - np.abs(np.arange(-lags, lags + 1)), cols - np.abs(np.arange(-lags, lags + 1)))
    return (window / overlap) / np.mean(x * x)


def kernel_autocorrelation(kernel: np.ndarray, lags: int) -> np.ndarray:
    """K ⋆ K for lags −lags..lags: the autocorrelation of white noise convolved with K (‖K‖₂ = 1)."""
    padded = np.zeros((kernel.shape[0] + 2 * lags, kernel.shape[1] + 2 * lags))
    padded[lags : lags + kernel.shape[0], lags : lags + kernel.shape[1]] = kernel
    result = np.empty((2 * lags + 1, 2 * lags + 1))
    for i, di in enumerate(range(-lags, lags + 1)):
        for j, dj in enumerate(range(-lags, lags + 1)):
            result[i, j] = np.sum(padded * np.roll(padded, (di, dj), axis=(0, 1)))
    return result


# Anisotropic and asymmetric, so that a swapped axis or a wrong centre would show.
SKEWED_KERNEL = np.array(
    [[0.0, 0.1, 0.0], [0.2, 0.5, 0.1], [0.3, 1.0, 0.4], [0.1, 0.6, 0.2], [0.0, 0.2, 0.1]]
) / np.sqrt(2.02)


@pytest.mark.parametrize(
    "name, kernel",
    [("skewed 5×3", SKEWED_KERNEL), ("gaussian σ 1.5 px", gaussian_kernel(1.5))],
)
def test_any_kernel_gives_its_autocorrelation_and_keeps_the_variance(name, kernel, sim_noise):
    level, lags = 5000.0, 6
    signal = np.full((1024, 1024), level)
    white = acquire(signal, sim_noise, 1.0, rng_or_seed=11).astype(float)
    correlated = acquire(signal, sim_noise, 1.0, rng_or_seed=11, kernel=kernel).astype(float)
    expected_var = sim_noise.gain * level + sim_noise.electronic_noise**2 + 1 / 12
    # The electronic noise and the rounding stay white: they dilute the quantum noise's correlation.
    quantum_share = sim_noise.gain * level / expected_var
    expected = quantum_share * kernel_autocorrelation(kernel, lags)
    expected[lags, lags] = 1.0
    measured = autocorrelation(correlated, lags)
    error = np.abs(measured - expected).max()
    print(
        f"{name}: variance {correlated.var():.1f} (white {white.var():.1f}, model {expected_var:.1f}); "
        f"autocorrelation at lags ≤ {lags}: largest error {error:.4f}, "
        f"lag (1, 0) {measured[lags + 1, lags]:.3f}/{expected[lags + 1, lags]:.3f}, "
        f"lag (0, 1) {measured[lags, lags + 1]:.3f}/{expected[lags, lags + 1]:.3f}"
    )
    assert correlated.var() == pytest.approx(expected_var, rel=0.02)
    assert correlated.var() == pytest.approx(white.var(), rel=0.02)
    assert error < 0.01  # the estimate's own spread is about 1/1024 per lag
    assert (
        np.abs(autocorrelation(white, lags) - np.eye(2 * lags + 1)[lags] * np.eye(2 * lags + 1)[:, [lags]]).max() < 0.01
    )


def test_crosstalk_is_the_3x3_kernel_shorthand(sim_noise):
    signal = np.full((64, 64), 1500.0)
    by_strength = acquire(signal, sim_noise, 0.5, rng_or_seed=12, crosstalk=0.3)
    by_kernel = acquire(signal, sim_noise, 0.5, rng_or_seed=12, kernel=crosstalk_kernel(0.3))
    assert np.array_equal(by_strength, by_kernel)


def test_crosstalk_and_kernel_together_are_refused(sim_noise):
    with pytest.raises(ValueError, match="not both"):
        acquire(np.full((8, 8), 100.0), sim_noise, crosstalk=0.5, kernel=gaussian_kernel(1.0))
    with pytest.raises(ValueError, match="not both"):
        acquire(np.full((8, 8), 100.0), sim_noise, crosstalk=0.0, kernel=gaussian_kernel(1.0))


@pytest.mark.parametrize(
    "kernel, match",
    [
        pytest.param(np.ones((2, 3)) / np.sqrt(6), "odd sides", id="even-side"),
        pytest.param(np.ones(3) / np.sqrt(3), "odd sides", id="1-D"),
        pytest.param(np.ones((3, 3)), "unit energy", id="not-unit-energy"),
        pytest.param(np.full((3, 3), np.nan), "unit energy", id="nan"),
    ],
)
def test_bad_kernels_are_refused(kernel, match, sim_noise):
    with pytest.raises(ValueError, match=match):
        acquire(np.full((8, 8), 100.0), sim_noise, kernel=kernel)


def test_the_detector_kernel_is_used_by_default(sim_noise):
    """A detector calibrated with a kernel is simulated with it; an explicit argument overrides it."""
    kernel = gaussian_kernel(1.0)
    calibrated = NoiseModel(sim_noise.gain, sim_noise.electronic_noise, sim_noise.offset, kernel)
    signal = np.full((256, 256), 3000.0)
    default = acquire(signal, calibrated, 1.0, rng_or_seed=13)
    assert np.array_equal(default, acquire(signal, sim_noise, 1.0, rng_or_seed=13, kernel=kernel))
    assert not np.array_equal(default, acquire(signal, sim_noise, 1.0, rng_or_seed=13))
    # crosstalk = 0 or a 1×1 kernel forces white noise on a correlated detector.
    white = acquire(signal, sim_noise, 1.0, rng_or_seed=13)
    assert np.array_equal(acquire(signal, calibrated, 1.0, rng_or_seed=13, crosstalk=0.0), white)
    assert np.array_equal(acquire(signal, calibrated, 1.0, rng_or_seed=13, kernel=np.ones((1, 1))), white)
    other = crosstalk_kernel(0.5)
    assert np.array_equal(
        acquire(signal, calibrated, 1.0, rng_or_seed=13, kernel=other),
        acquire(signal, sim_noise, 1.0, rng_or_seed=13, kernel=other),
    )
    print(
        f"neighbour correlation: detector kernel {neighbour_correlation(default.astype(float)):.3f}, "
        f"forced white {neighbour_correlation(white.astype(float)):.3f}"
    )


@pytest.mark.parametrize("sigma, neighbour", [(0.5, 0.261), (1.0, np.exp(-1 / 4)), (2.0, np.exp(-1 / 16))])
def test_gaussian_kernel(sigma, neighbour):
    kernel = gaussian_kernel(sigma)
    radius = int(np.ceil(3 * sigma))
    assert kernel.shape == (2 * radius + 1, 2 * radius + 1)
    assert np.sum(kernel**2) == pytest.approx(1.0)
    assert np.array_equal(kernel, kernel[::-1]) and np.array_equal(kernel, kernel.T)
    assert kernel[radius, radius] == kernel.max()
    # White noise through it: neighbour correlation exp(−1/4σ²) (the autocorrelation is a Gaussian of
    # σ√2) once σ ≥ 1 px; at σ = 0.5 px the sampled kernel correlates less.
    assert kernel_autocorrelation(kernel, 1)[1, 2] == pytest.approx(neighbour, abs=1e-3)
    assert gaussian_kernel(sigma, radius=1).shape == (3, 3)
    assert np.sum(gaussian_kernel(sigma, radius=1) ** 2) == pytest.approx(1.0)


def test_gaussian_kernel_edge_cases():
    assert np.array_equal(gaussian_kernel(0.0), np.ones((1, 1)))
    with pytest.raises(ValueError, match="sigma"):
        gaussian_kernel(-1.0)
    with pytest.raises(ValueError, match="radius"):
        gaussian_kernel(1.0, radius=-1)
