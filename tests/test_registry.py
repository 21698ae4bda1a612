"""The single restorer registry."""

import subprocess
import sys

import numpy as np
import pytest

from dicom_node.restore.gat_bm3d import GatBm3dRestorer
from dicom_node.restore.registry import create_restorer, register_restorer, restorer_names


def test_gat_bm3d_is_registered():
    print("restorers:", restorer_names())
    assert "gat-bm3d" in restorer_names()
    restorer = create_restorer("gat-bm3d", margin=48, blend="noise-aware")
    assert isinstance(restorer, GatBm3dRestorer) and restorer.name == "gat-bm3d" and restorer.margin == 48


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(ValueError, match="unknown restorer 'nope'.*gat-bm3d"):
        create_restorer("nope")


def test_register_a_restorer():
    @register_restorer("test-identity")
    class Identity:
        name = "test-identity"

        def restore(self, raw, noise, dose_fraction):
            return raw

    assert "test-identity" in restorer_names()
    assert isinstance(create_restorer("test-identity"), Identity)
    with pytest.raises(ValueError, match="already registered"):
        register_restorer("test-identity")(lambda: None)


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


def test_unknown_denoiser_lists_the_available_ones():
    with pytest.raises(ValueError, match="unknown denoiser 'fast'.*bm3d"):
        create_restorer("gat-bm3d", denoiser="fast")


def test_bm3d_backend_removes_noise():
    from dicom_node.restore.denoisers import get_denoiser

    rng = np.random.default_rng(0)
    clean = 20 + 5 * np.sin(np.linspace(0, 6, 64))[:, None] * np.ones((1, 64))
    noisy = clean + rng.normal(size=clean.shape)
    for wiener in (True, False):
        error = np.std(get_denoiser("bm3d", wiener=wiener)(noisy, 1.0) - clean)
        print(f"bm3d wiener={wiener}: error std {error:.3f} (input 1.0)")
        assert error < 0.35
