"""The Anscombe-domain dose simulation reaches E = γy + τ and var = λγy + σ_e² (science.md)."""

import numpy as np
import pytest

from dicom_node.restore.noise import NoiseModel
from dicom_node.sim.acquisition import acquire, crosstalk_kernel, gaussian_kernel
from dicom_node.sim.dose import simulate_dose_reduction


def simulated_statistics(noise: NoiseModel, level: float, gamma: float, seed: int = 0):
    full = acquire(np.full((600, 600), level), noise, 1.0, rng_or_seed=seed).astype(float)
    low = simulate_dose_reduction(full, noise, gamma, rng_or_seed=seed + 1)
    return low.mean(), low.var()


@pytest.mark.parametrize("gamma", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("noise, level", [(NoiseModel(0.1, 3.0, 50.0), 600.0), (NoiseModel(0.2, 2.0, 40.0), 3000.0)])
def test_low_dose_statistics(noise, level, gamma):
    mean, var = simulated_statistics(noise, level, gamma)
    expected_var = noise.gain * gamma * level + noise.electronic_noise**2 + gamma**2 / 12  # + scaled rounding
    print(
        f"γ {gamma} level {level}: mean {mean:.2f}/{gamma * level + noise.offset:.2f} var {var:.2f}/{expected_var:.2f}"
    )
    assert mean == pytest.approx(gamma * level + noise.offset, rel=0.005)
    assert var == pytest.approx(expected_var, rel=0.04)


def test_electronic_top_up_is_sqrt_one_minus_gamma_squared():
    """With strong electronic noise, the (1 − γ) variant visibly under-injects; ours does not."""
    noise, level, gamma = NoiseModel(0.05, 12.0, 50.0), 200.0, 0.5
    target = noise.gain * gamma * level + noise.electronic_noise**2 + gamma**2 / 12
    mean, var = simulated_statistics(noise, level, gamma, seed=7)
    # σ_e enters the simulation only through the top-up k_e·σ_e, so a model with a smaller σ_e
    # runs the public variant k_e = √(1 − γ) on the same full-dose images.
    variant = NoiseModel(noise.gain, noise.electronic_noise * np.sqrt((1 - gamma) / (1 - gamma**2)), noise.offset)
    low = simulate_dose_reduction(acquire(np.full((600, 600), level), noise, 1.0, rng_or_seed=7), variant, gamma, 8)
    print(f"variance {var:.1f}, target {target:.1f}, the (1 − γ) top-up gives {low.var():.1f}")
    assert var == pytest.approx(target, rel=0.04)
    assert low.var() != pytest.approx(target, rel=0.04)  # the test can tell the two apart


def test_correlated_injection_keeps_the_variance(sim_noise):
    noise, level, gamma = sim_noise, 2000.0, 0.5
    full = acquire(np.full((600, 600), level), noise, 1.0, rng_or_seed=9).astype(float)
    low = simulate_dose_reduction(full, noise, gamma, 10, kernel=crosstalk_kernel(0.5))
    expected = noise.gain * gamma * level + noise.electronic_noise**2 + gamma**2 / 12
    injected = low - gamma * full  # the added noise alone (to first order)
    x = injected - injected.mean()
    correlation = np.mean(x[:, 1:] * x[:, :-1]) / np.mean(x * x)
    print(
        f"variance with a correlated kernel {low.var():.1f}/{expected:.1f}, "
        f"injected neighbour correlation {correlation:.2f}"
    )
    assert low.var() == pytest.approx(expected, rel=0.04)
    assert correlation > 0.3


def test_a_correlated_detector_stays_correlated_at_low_dose(sim_noise):
    """Full dose acquired with the detector's kernel, reduced with the same (its default): the
    low-dose noise has the variance of the model and the full-dose image's correlation."""
    kernel = gaussian_kernel(1.0)
    noise = NoiseModel(sim_noise.gain, sim_noise.electronic_noise, sim_noise.offset, kernel)
    level, gamma = 4000.0, 0.5
    full = acquire(np.full((800, 800), level), noise, 1.0, rng_or_seed=21).astype(float)
    low = simulate_dose_reduction(full, noise, gamma, 22)
    real_low = acquire(np.full((800, 800), level), noise, gamma, rng_or_seed=23).astype(float)
    expected_var = noise.gain * gamma * level + noise.electronic_noise**2 + gamma**2 / 12
    print(
        f"variance {low.var():.1f}/{expected_var:.1f}; neighbour correlation full {neighbour_correlation(full):.3f}, "
        f"simulated low {neighbour_correlation(low):.3f}, acquired low {neighbour_correlation(real_low):.3f}"
    )
    assert low.mean() == pytest.approx(gamma * level + noise.offset, rel=0.002)
    assert low.var() == pytest.approx(expected_var, rel=0.04)
    assert neighbour_correlation(low) == pytest.approx(neighbour_correlation(real_low), abs=0.02)
    assert neighbour_correlation(low) > 0.6
    # An explicit kernel overrides the detector's; a 1×1 kernel injects white noise.
    assert np.array_equal(low, simulate_dose_reduction(full, sim_noise, gamma, 22, kernel=kernel))
    white = simulate_dose_reduction(full, noise, gamma, 22, kernel=np.ones((1, 1)))
    assert np.array_equal(white, simulate_dose_reduction(full, sim_noise, gamma, 22))


def test_a_stack_of_patches_takes_a_2d_kernel_frame_by_frame(sim_noise):
    """trainer/ passes [patch, row, column] stacks; a 2-D kernel and a [1, k, k] one are the same."""
    patches = acquire(np.full((6, 32, 32), 2000.0), sim_noise, 1.0, rng_or_seed=24).astype(float)
    kernel = crosstalk_kernel(0.5)
    as_2d = simulate_dose_reduction(patches, sim_noise, 0.5, 25, kernel=kernel)
    as_3d = simulate_dose_reduction(patches, sim_noise, 0.5, 25, kernel=kernel[None])
    assert as_2d.shape == patches.shape and np.array_equal(as_2d, as_3d)
    first = simulate_dose_reduction(patches[:1], sim_noise, 0.5, 25, kernel=kernel)
    assert not np.allclose(first[0], as_2d[1])


@pytest.mark.parametrize(
    "kernel",
    [
        pytest.param(np.ones((3, 3)), id="not-unit-energy"),
        pytest.param(np.ones((2, 2)) / 2, id="even-side"),
        pytest.param(np.ones((3, 3, 3)) / np.sqrt(27), id="3-D"),
    ],
)
def test_rejects_bad_kernels(kernel, sim_noise):
    with pytest.raises(ValueError, match="noise kernel"):
        simulate_dose_reduction(np.full((8, 8), 500.0), sim_noise, 0.5, 0, kernel=kernel)


def neighbour_correlation(image: np.ndarray) -> float:
    x = image - image.mean()
    return float(np.mean(x[:, 1:] * x[:, :-1]) / np.mean(x * x))


@pytest.mark.parametrize(
    "dose_fraction",
    [pytest.param(0.0, id="zero"), pytest.param(-0.5, id="negative"), pytest.param(1.5, id="above-one")],
)
def test_rejects_bad_dose_fraction(dose_fraction, sim_noise):
    with pytest.raises(ValueError, match="dose fraction"):
        simulate_dose_reduction(np.ones((4, 4)), sim_noise, dose_fraction)
