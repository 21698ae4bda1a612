"""The single restorer registry."""

import subprocess
import sys

import numpy as np
import pytest

from dicom_node.errors import ConfigurationError
from dicom_node.restore.gat_bm3d import GatBm3dRestorer
from dicom_node.restore.noise import NoiseModel
from dicom_node.restore.registry import (
    Environment,
    Provenance,
    Restoration,
    RestorerOptions,
    create_restorer,
    register_restorer,
    restorer_names,
)


def test_gat_bm3d_is_registered():
    print("restorers:", restorer_names())
    assert "gat-bm3d" in restorer_names()
    restorer = create_restorer("gat-bm3d", margin=48, blend="noise-aware")
    assert isinstance(restorer, GatBm3dRestorer) and restorer.name == "gat-bm3d" and restorer.margin == 48


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        pytest.param("nope", {}, "unknown restorer 'nope'.*gat-bm3d", id="unknown-restorer"),
        pytest.param(
            "gat-bm3d", {"denoiser": "fast"}, "denoiser: Input should be 'bm3d' or 'network'", id="unknown-denoiser"
        ),
    ],
)
def test_unknown_name_lists_the_available_ones(name, options, match):
    with pytest.raises(ConfigurationError, match=match):
        create_restorer(name, **options)


def test_register_a_restorer_with_its_options_and_the_environment():
    class IdentityOptions(RestorerOptions):
        scale: float = 1.0

    class Identity:
        name = "test-identity"

        def __init__(self, scale, device):
            self.scale, self.device = scale, device

        def restore(self, raw, noise, dose_fraction):
            return Restoration(raw * self.scale, Provenance(self.name, self.device, {"scale": self.scale}))

    @register_restorer("test-identity", IdentityOptions)
    def create(options, environment):
        return Identity(options.scale, environment.device)

    assert "test-identity" in restorer_names()
    restorer = create_restorer("test-identity", Environment(device="cpu"), scale=2)
    assert isinstance(restorer, Identity) and (restorer.scale, restorer.device) == (2.0, "cpu")
    restoration = restorer.restore(np.ones((2, 2)), None, 0.5)
    assert restoration.provenance.describe() == "test-identity scale=2.0"
    with pytest.raises(ConfigurationError, match="scale: Input should be a valid number"):
        create_restorer("test-identity", scale="big")
    with pytest.raises(ConfigurationError, match="sharpness: unknown option for restorer test-identity"):
        create_restorer("test-identity", sharpness=1)
    with pytest.raises(ValueError, match="already registered"):
        register_restorer("test-identity")(lambda options, environment: None)


def test_a_restoration_carries_its_provenance():
    rng = np.random.default_rng(3)
    raw = 50 + rng.poisson(400, (96, 96)).astype(float) * 0.1
    result = create_restorer("gat-bm3d", blend="plain").restore(raw, NoiseModel(0.1, 3.0, 50.0), 0.5)
    options = {"blend": "plain", "margin": 32, "denoiser": "bm3d", "noise": "white"}
    assert result.provenance == Provenance("gat-bm3d", "cpu", options)
    assert result.provenance.describe() == "gat-bm3d blend=plain denoiser=bm3d margin=32 noise=white"
    # A detector whose noise model has a correlation kernel: BM3D was told the spectrum.
    kernel = np.outer([0.5, 1.0, 0.5], [0.5, 1.0, 0.5]) / 1.5
    coloured = create_restorer("gat-bm3d", blend="plain").restore(raw, NoiseModel(0.1, 3.0, 50.0, kernel), 0.5)
    assert coloured.provenance.options["noise"] == "coloured"
    assert coloured.provenance.describe() == "gat-bm3d blend=plain denoiser=bm3d margin=32 noise=coloured"


def test_registry_imports_neither_torch_nor_bm3d():
    code = (
        "import sys\n"
        "from dicom_node.restore.registry import create_restorer, restorer_names\n"
        "restorer_names(); create_restorer('gat-bm3d')\n"
        "print(sorted(m for m in ('torch', 'bm3d', 'pydicom') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    print("heavy modules imported:", result.stdout.strip())
    assert result.stdout.strip() == "[]"


def test_bm3d_backend_removes_noise():
    from dicom_node.restore.denoisers import get_denoiser

    rng = np.random.default_rng(0)
    clean = 20 + 5 * np.sin(np.linspace(0, 6, 64))[:, None] * np.ones((1, 64))
    noisy = clean + rng.normal(size=clean.shape)
    for wiener in (True, False):
        error = np.std(get_denoiser("bm3d", wiener=wiener)(noisy, 1.0) - clean)
        print(f"bm3d wiener={wiener}: error std {error:.3f} (input 1.0)")
        assert error < 0.35


def _correlated_test_image(seed: int = 0, sigma: float = 1.0):
    """A small smooth image with a disk, and its copy under σ·(κ ⊛ n), κ the CsI-like 3×3 crosstalk kernel."""
    from scipy import ndimage

    from dicom_node.sim.acquisition import crosstalk_kernel

    rows, cols = np.mgrid[0:96, 0:96] / 96
    clean = 20 + 4 * np.sin(9 * rows + 2) * np.cos(7 * cols) + 3 * ((rows - 0.5) ** 2 + (cols - 0.5) ** 2 < 0.08)
    kernel = crosstalk_kernel(0.5)
    noise = ndimage.convolve(np.random.default_rng(seed).standard_normal(clean.shape), kernel, mode="wrap")
    return clean, clean + sigma * noise, kernel


def test_noise_psd_is_the_expected_periodogram_of_the_noise():
    """bm3d's PSD convention, psd = E|fft2(noise)|² = |fft2(κ, shape)|²·N·σ², checked on noise itself."""
    from scipy import ndimage

    from dicom_node.restore.denoisers import noise_psd
    from dicom_node.sim.acquisition import crosstalk_kernel

    rng = np.random.default_rng(1)
    kernel, sigma, shape = crosstalk_kernel(0.5), 0.7, (32, 48)
    psd = noise_psd(kernel, shape, sigma)
    periodogram = np.mean(
        [
            np.abs(np.fft.fft2(sigma * ndimage.convolve(rng.standard_normal(shape), kernel, mode="wrap"))) ** 2
            for _ in range(400)
        ],
        axis=0,
    )
    inside = psd > 0.05 * psd.max()  # the kernel's spectrum reaches zero at Nyquist: compare where it is not tiny
    ratio = np.median(periodogram[inside] / psd[inside])
    print(f"PSD mean / (N·σ²) {psd.mean() / (psd.size * sigma**2):.4f}; periodogram / PSD, median {ratio:.3f}")
    assert psd.shape == shape
    np.testing.assert_allclose(psd.mean(), psd.size * sigma**2, rtol=1e-12)  # Parseval: ‖κ‖₂ = 1 keeps σ²
    np.testing.assert_allclose(ratio, 1.0, atol=0.05)
    np.testing.assert_allclose(noise_psd(np.ones((1, 1)), shape, sigma), np.full(shape, psd.size * sigma**2))


def test_bm3d_white_kernel_equals_the_scalar_sigma():
    """κ = δ through the spectrum path is the scalar-σ path (bm4d's own conversion of σ)."""
    from dicom_node.restore.denoisers import get_denoiser

    clean, _, _ = _correlated_test_image()
    noisy = clean + 0.5 * np.random.default_rng(2).standard_normal(clean.shape)
    delta = np.zeros((3, 3))
    delta[1, 1] = 1.0
    denoise = get_denoiser("bm3d")
    scalar, spectrum = denoise(noisy, 0.5), denoise(noisy, 0.5, delta)
    print(f"white κ vs scalar σ: max |difference| {np.max(np.abs(spectrum - scalar)):.2e}")
    np.testing.assert_allclose(spectrum, scalar, rtol=0, atol=1e-5)  # BM3D computes in float32


def test_bm3d_told_the_spectrum_beats_white_bm3d_on_correlated_noise():
    from dicom_node.restore.denoisers import get_denoiser

    clean, noisy, kernel = _correlated_test_image()
    denoise = get_denoiser("bm3d")

    def rmse(image):
        return float(np.sqrt(np.mean((image - clean) ** 2)))

    white, coloured = rmse(denoise(noisy, 1.0)), rmse(denoise(noisy, 1.0, kernel))
    print(
        f"correlated noise: RMSE input {rmse(noisy):.3f}, white BM3D {white:.3f}, BM3D told the spectrum {coloured:.3f}"
    )
    assert coloured < 0.75 * white < 0.75 * rmse(noisy)


def test_spectrum_path_provides_np_trapz_where_numpy_lacks_it(monkeypatch):
    """bm4d 4.2.5 estimates its thresholds from a PSD with np.trapz, which NumPy 2.4 removed."""
    import bm3d

    from dicom_node.restore.denoisers import get_denoiser, noise_psd

    clean, noisy, kernel = _correlated_test_image(sigma=0.5)
    noisy = noisy[:48, :48]
    denoise = get_denoiser("bm3d", wiener=False)
    monkeypatch.delattr(np, "trapz", raising=False)  # as on NumPy ≥ 2.4, whatever ran before
    with pytest.raises(AttributeError, match="trapz"):  # the bug: bm3d with a PSD, left alone
        bm3d.bm3d(noisy, noise_psd(kernel, noisy.shape, 0.5), profile="np")
    denoise(noisy, 0.5)
    assert not hasattr(np, "trapz")  # the scalar path neither needs nor installs the alias
    denoise(noisy, 0.5, kernel)
    assert np.trapz is np.trapezoid  # the spectrum path did, and then ran

    calls = []

    def own_trapz(*args, **kwargs):  # NumPy < 2.4: its own np.trapz is kept, and it is what bm4d calls
        calls.append(1)
        return np.trapezoid(*args, **kwargs)

    monkeypatch.setattr(np, "trapz", own_trapz, raising=False)
    denoise(noisy, 0.5, kernel)
    print(f"NumPy {np.__version__}: bm4d called np.trapz {len(calls)} times on the spectrum path")
    assert np.trapz is own_trapz and calls


def test_kernel_larger_than_the_image_is_refused():
    from dicom_node.errors import InputRefused
    from dicom_node.restore.denoisers import noise_psd

    with pytest.raises(InputRefused, match="smaller than the noise kernel"):
        noise_psd(np.ones((9, 9)) / 9, (8, 64))
