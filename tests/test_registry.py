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
        pytest.param("gat-bm3d", {"denoiser": "fast"}, "unknown denoiser 'fast'.*bm3d", id="unknown-denoiser"),
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
    assert result.provenance == Provenance("gat-bm3d", "cpu", {"blend": "plain", "margin": 32, "denoiser": "bm3d"})
    assert result.provenance.describe() == "gat-bm3d blend=plain denoiser=bm3d margin=32"


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
