"""Model-based restoration (GAT → BM3D → inverse → blend) on a small synthetic raw image."""

import numpy as np
import pytest
from scipy import ndimage

from dicom_node.errors import ConfigurationError, InputRefused
from dicom_node.restore.blend import blend, blend_weights
from dicom_node.restore.gat_bm3d import GatBm3dRestorer
from dicom_node.restore.mask import bounding_box, breast_mask
from dicom_node.restore.noise import NoiseModel

GAIN, SIGMA_E, OFFSET = 0.1, 3.0, 50.0
NOISE = NoiseModel(GAIN, SIGMA_E, OFFSET)
SIZE = 160
REALISATIONS = 4


def phantom(size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Offset-free full-dose signal: a breast on the left edge (smooth tissue + small disks)
    in front of a bright direct-exposure background; and the true breast region."""
    rows, cols = np.mgrid[0:size, 0:size] / size
    breast = (rows - 0.5) ** 2 + (cols / 0.8) ** 2 < 0.42**2
    tissue = 600 + 150 * np.sin(6 * rows + 1) * np.cos(5 * cols)
    for row, col, radius, factor in [(0.3, 0.2, 0.02, 1.3), (0.6, 0.3, 0.015, 0.7), (0.45, 0.45, 0.01, 1.5)]:
        tissue = np.where((rows - row) ** 2 + (cols - col) ** 2 < radius**2, tissue * factor, tissue)
    skin = ndimage.gaussian_filter(breast.astype(float), 2)
    return skin * tissue + (1 - skin) * 4000.0, breast


def acquire(signal: np.ndarray, dose_fraction: float, rng) -> np.ndarray:
    return GAIN * rng.poisson(dose_fraction * signal / GAIN) + rng.normal(0, SIGMA_E, signal.shape) + OFFSET


class SpyDenoiser:
    """Records what it is given and smooths lightly, like a (weak) denoiser."""

    name = "spy"

    def __init__(self) -> None:
        self.shapes: list[tuple[int, int]] = []
        self.images: list[np.ndarray] = []
        self.kernels: list[np.ndarray | None] = []

    def for_image(self, gat_image, noise, dose_fraction):
        return self

    def __call__(self, image: np.ndarray, sigma: float, kernel: np.ndarray | None = None) -> np.ndarray:
        self.shapes.append(image.shape)
        self.images.append(image.copy())
        self.kernels.append(kernel)
        return ndimage.gaussian_filter(image, 1.0)


@pytest.fixture(scope="module")
def restorations():
    """Full-dose, half-dose, and the restored half-dose images, a few noise realisations each."""
    rng = np.random.default_rng(7)
    signal, breast = phantom()
    plain, aware = GatBm3dRestorer(blend="plain"), GatBm3dRestorer(blend="noise-aware")
    runs = {"full": [], "linear": [], "plain": [], "noise-aware": []}
    for _ in range(REALISATIONS):
        low = acquire(signal, 0.5, rng)
        runs["full"].append(acquire(signal, 1.0, rng))
        runs["linear"].append((low - OFFSET) / 0.5 + OFFSET)
        runs["plain"].append(plain.restore(low, NOISE, 0.5))
        runs["noise-aware"].append(aware.restore(low, NOISE, 0.5))
    print("\nQC (plain):", {k: round(v, 4) for k, v in runs["plain"][0].qc.items()})
    print("timings (plain):", {k: round(v, 3) for k, v in runs["plain"][0].timings.items()})
    images = {name: np.array([getattr(x, "image", x) for x in run]) - OFFSET for name, run in runs.items()}
    return signal, ndimage.binary_erosion(breast, iterations=6), images, runs


def figures(images: np.ndarray, signal: np.ndarray, inside: np.ndarray) -> dict[str, float]:
    """Mean ratio, noise over realisations relative to a full-dose acquisition, error vs truth."""
    full_dose_variance = GAIN * signal[inside] + SIGMA_E**2
    return {
        "mean_ratio": images.mean(axis=0)[inside].mean() / signal[inside].mean(),
        "noise_ratio": np.mean(images.var(axis=0, ddof=1)[inside]) / np.mean(full_dose_variance),
        "mse": np.mean((images - signal)[:, inside] ** 2),
    }


def test_restored_image_has_full_dose_mean_and_noise(restorations):
    signal, inside, images, _ = restorations
    measured = {name: figures(stack, signal, inside) for name, stack in images.items()}
    for name, values in measured.items():
        print(name, {k: round(float(v), 4) for k, v in values.items()})
    for name in ("plain", "noise-aware"):
        assert abs(measured[name]["mean_ratio"] - 1) < 0.01
        assert 0.8 < measured[name]["noise_ratio"] < 1.3
        assert measured[name]["mse"] < 0.75 * measured["linear"]["mse"]
    # The noise-aware blend accounts for the estimate's own noise: closer to the full-dose level.
    assert abs(measured["noise-aware"]["noise_ratio"] - 1) < abs(measured["plain"]["noise_ratio"] - 1)


def test_qc_figures(restorations):
    _, _, _, runs = restorations
    qc = runs["plain"][0].qc
    assert 0.15 < qc["breast_fraction"] < 0.3
    assert abs(qc["mean_ratio"] - 1) < 0.01
    assert "calibration_noise_std" not in qc  # the common figures are image_qc's: tests/test_qc.py
    assert np.isnan(qc["estimate_variance"])  # measured by the noise-aware blend only
    assert 0 < runs["noise-aware"][0].qc["estimate_variance"] < 0.5
    assert {"mask", "gat", "denoise", "inverse", "blend", "total"} <= runs["plain"][0].timings.keys()


def test_blend_with_noise_free_estimate_has_full_dose_mean_and_variance():
    signal = np.geomspace(1.0, 10_000.0, 50)
    for dose_fraction in (0.25, 0.5, 0.8):
        estimate = dose_fraction * signal + OFFSET
        w_low, w_estimate = blend_weights(estimate, NOISE, dose_fraction)
        np.testing.assert_allclose(w_low + w_estimate, 1 / dose_fraction, rtol=1e-12)
        low_variance = GAIN * dose_fraction * signal + SIGMA_E**2
        np.testing.assert_allclose(w_low**2 * low_variance, GAIN * signal + SIGMA_E**2, rtol=1e-12)
        # A noise-free z (its mean) maps to the full-dose mean, offset kept.
        np.testing.assert_allclose(blend(estimate, estimate, NOISE, dose_fraction), signal + OFFSET, rtol=1e-12)


def test_noise_aware_weights_give_full_dose_variance():
    rng = np.random.default_rng(0)
    estimate = rng.uniform(100, 5000, 200) + OFFSET
    covariance = rng.uniform(0.0, 0.4, 200)
    variance = covariance * rng.uniform(0.5, 1.0, 200)  # shrinkage: var(ε) ≤ cov(n, ε)
    r, q = 0.5, 2.0
    w_low, w_estimate = blend_weights(estimate, NOISE, r, variance, covariance)
    low_variance = NOISE.variance(estimate - OFFSET)
    output_variance = low_variance * (w_low**2 + w_estimate**2 * variance + 2 * w_low * w_estimate * covariance)
    reachable = w_low > 0
    print(f"weights reach the target for {reachable.mean():.0%} of the cases")
    np.testing.assert_allclose(w_low + w_estimate, q, rtol=1e-12)
    np.testing.assert_allclose(
        output_variance[reachable], NOISE.variance((estimate - OFFSET) / r)[reachable], rtol=1e-9
    )


@pytest.mark.parametrize(
    "dose_fraction", [0, -0.5, 1.5, float("nan"), "0.5"], ids=["zero", "negative", "above-one", "nan", "a-string"]
)
def test_rejects_bad_dose_fraction(dose_fraction):
    with pytest.raises(InputRefused, match="dose_fraction"):
        GatBm3dRestorer(denoiser=SpyDenoiser()).restore(np.full((64, 64), 100.0), NOISE, dose_fraction)


@pytest.mark.parametrize(
    ("image", "noise", "match"),
    [
        pytest.param(np.ones((4, 64, 64)), NOISE, "2-D", id="three-dimensional"),
        pytest.param(np.where(np.eye(64) > 0, np.nan, 100.0), NOISE, "NaN", id="nan-pixels"),
        pytest.param(np.ones((64, 64)), NoiseModel(np.full((32, 32), 0.1), 3.0, 50.0), "gain map", id="gain-map-shape"),
    ],
)
def test_rejects_bad_images(image, noise, match):
    with pytest.raises(InputRefused, match=match):
        GatBm3dRestorer(denoiser=SpyDenoiser()).restore(image, noise, 0.5)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        pytest.param({"margin": 8}, "margin", id="margin-too-small"),
        pytest.param({"blend": "magic"}, "plain", id="unknown-blend"),
    ],
)
def test_rejects_bad_settings(options, match):
    with pytest.raises(ConfigurationError, match=match):
        GatBm3dRestorer(**options)


def test_denoiser_sees_only_the_breast_bounding_box():
    signal, _ = phantom(192)
    low = acquire(signal, 0.5, np.random.default_rng(1))
    spy = SpyDenoiser()
    result = GatBm3dRestorer(denoiser=spy, blend="plain").restore(low, NOISE, 0.5)
    rows, cols = bounding_box(breast_mask(low, NOISE), 32)
    print("denoiser shapes:", spy.shapes, "image:", low.shape)
    assert spy.shapes == [(rows.stop - rows.start, cols.stop - cols.start)]
    spy.shapes.clear()
    GatBm3dRestorer(denoiser=spy, blend="noise-aware").restore(low, NOISE, 0.5)  # two probes, two calls each
    assert spy.shapes == [(rows.stop - rows.start, cols.stop - cols.start)] * 5
    spy.shapes.clear()
    GatBm3dRestorer(denoiser=spy, blend="spectral").restore(low, NOISE, 0.5)  # one probe, two calls
    assert spy.shapes == [(rows.stop - rows.start, cols.stop - cols.start)] * 3
    assert spy.shapes[0][1] < low.shape[1]
    outside = np.ones(low.shape, dtype=bool)
    outside[rows, cols] = False
    np.testing.assert_allclose(result.image[outside], ((low - OFFSET) / 0.5 + OFFSET)[outside])


def test_full_dose_is_identity_and_empty_image_is_rescaled():
    spy = SpyDenoiser()
    image = acquire(phantom()[0], 1.0, np.random.default_rng(2))
    np.testing.assert_array_equal(GatBm3dRestorer(denoiser=spy).restore(image, NOISE, 1.0).image, image)
    saturated = np.full((96, 96), 16383.0)
    result = GatBm3dRestorer(denoiser=spy).restore(saturated, NOISE, 0.5)
    assert spy.shapes == [] and result.qc["breast_fraction"] == 0
    np.testing.assert_allclose(result.image, (saturated - OFFSET) / 0.5 + OFFSET)


def test_breast_mask():
    signal, breast = phantom(192)
    low = acquire(signal, 0.5, np.random.default_rng(3))
    mask = breast_mask(low, NOISE)
    dice = 2 * np.sum(mask & breast) / (mask.sum() + breast.sum())
    print(f"mask Dice vs truth {dice:.3f}, outside truth {np.sum(mask & ~breast)} px")
    assert dice > 0.9 and np.sum(mask & ~breast) < 0.01 * breast.sum()
    filled = acquire(np.full((128, 128), 600.0) + 100 * np.sin(np.arange(128) / 9), 0.5, np.random.default_rng(4))
    assert breast_mask(filled, NOISE).all()  # a breast (or phantom) that fills the detector
    assert not breast_mask(np.full((64, 64), 16383.0), NOISE).any()  # nothing but saturation


def test_bounding_box_is_clipped_to_the_image():
    mask = np.zeros((100, 80), dtype=bool)
    mask[10:20, 70:75] = True
    assert bounding_box(mask, 32) == (slice(0, 52), slice(38, 80))
    assert bounding_box(np.zeros((5, 5), dtype=bool), 3) == (slice(0, 0), slice(0, 0))


CROSSTALK = np.outer([0.5, 1.0, 0.5], [0.5, 1.0, 0.5]) / 1.5  # unit energy; neighbours correlate by 2/3


def lag_one_correlation(field: np.ndarray) -> float:
    """Correlation of horizontally adjacent pixels."""
    a, b = field[:, :-1].ravel(), field[:, 1:].ravel()
    return float(np.corrcoef(a, b)[0, 1])


@pytest.mark.parametrize("kernel", [None, CROSSTALK], ids=["white", "coloured"])
def test_denoiser_is_told_the_noise_kernel_and_probes_share_it(kernel):
    """The box noise model's κ reaches the main call and the noise-aware probes, whose perturbations
    are coloured with κ like the image's own noise (white without a kernel)."""
    signal, _ = phantom(128)
    low = acquire(signal, 0.5, np.random.default_rng(8))
    spy = SpyDenoiser()
    noise = NoiseModel(GAIN, SIGMA_E, OFFSET, kernel)
    result = GatBm3dRestorer(denoiser=spy, blend="noise-aware").restore(low, noise, 0.5)
    assert len(spy.kernels) == 5  # the estimate, then ± each of two probes
    for given in spy.kernels:
        assert given is None if kernel is None else np.array_equal(given, kernel)
    probes = [(image - spy.images[0]) / 0.3 for image in spy.images[1:]]  # _PROBE_STEP
    correlations = [lag_one_correlation(probe) for probe in probes]
    expected = 0.0 if kernel is None else float(np.sum(kernel[:, :-1] * kernel[:, 1:]))  # 2/3 for CROSSTALK
    print(
        f"{'white' if kernel is None else 'coloured'}: probe std {[round(float(p.std()), 3) for p in probes]}, "
        f"lag-1 correlation {[round(c, 3) for c in correlations]} (expected {expected:.3f})"
    )
    for probe, correlation in zip(probes, correlations, strict=True):
        assert abs(probe.std() - 1) < 0.05 and abs(correlation - expected) < 0.05
    assert result.provenance.options["noise"] == ("white" if kernel is None else "coloured")


def test_mb_with_a_correlated_noise_model_end_to_end():
    """Real BM3D told the spectrum, on a small phantom with CsI-like correlated quantum noise.

    κ here is the crosstalk kernel itself (quantum noise dominates the GAT-domain noise at these
    levels; tests/test_mb_phantom.py measures the GAT-domain kernel from flat fields instead).
    """
    from dicom_node.sim.acquisition import acquire as acquire_detector
    from dicom_node.sim.acquisition import crosstalk_kernel

    signal, breast = phantom(128)
    inside = ndimage.binary_erosion(breast, iterations=6)
    kernel = crosstalk_kernel(0.5)
    rng = np.random.default_rng(9)
    low = acquire_detector(signal, NOISE, 0.5, rng, crosstalk=0.5).astype(np.float64)
    linear = (low - OFFSET) / 0.5
    errors = {}
    for label, noise in (("white", NOISE), ("coloured", NoiseModel(GAIN, SIGMA_E, OFFSET, kernel))):
        result = GatBm3dRestorer(blend="plain").restore(low, noise, 0.5)
        assert result.provenance.options["noise"] == label
        assert np.all(np.isfinite(result.image)) and abs(result.qc["mean_ratio"] - 1) < 0.01
        errors[label] = float(np.sqrt(np.mean((result.image - OFFSET - signal)[inside] ** 2)))
        print(label, {k: round(v, 3) for k, v in result.qc.items()}, f"RMSE vs truth {errors[label]:.2f}")
    linear_error = float(np.sqrt(np.mean((linear - signal)[inside] ** 2)))
    print(f"RMSE vs truth: linear rescale {linear_error:.2f}")
    assert errors["coloured"] < errors["white"] < linear_error


def test_qc_reads_the_noise_correlation_of_the_background_against_the_model():
    from dicom_node.sim.acquisition import acquire
    from dicom_node.sim.phantom import make_phantom

    phantom = make_phantom((192, 160), seed=5)

    class Identity:  # the QC figures are what is tested: skip BM3D's time
        name = "identity"

        def for_image(self, gat_image, noise, dose_fraction):
            return self

        def __call__(self, image, sigma, kernel=None):
            return image

    restorer = GatBm3dRestorer(denoiser=Identity())
    white = acquire(phantom.signal, NOISE, 0.5, rng_or_seed=1)
    correlated = acquire(phantom.signal, NOISE, 0.5, rng_or_seed=1, crosstalk=0.5)
    fits = restorer.restore(white, NOISE, 0.5).qc
    misfit = restorer.restore(correlated, NOISE, 0.5).qc
    print("white:", {k: round(v, 3) for k, v in fits.items() if k.startswith("noise_")})
    print("correlated, white model:", {k: round(v, 3) for k, v in misfit.items() if k.startswith("noise_")})
    assert fits["noise_correlation_expected"] == 0.0 and misfit["noise_correlation_expected"] == 0.0
    assert abs(fits["noise_correlation"]) < 0.05 and fits["noise_correlation_difference"] < 0.05
    assert misfit["noise_correlation"] > 0.3 and misfit["noise_correlation_difference"] > 0.3
