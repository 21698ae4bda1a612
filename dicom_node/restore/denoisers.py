"""White-Gaussian-noise denoisers behind one small interface.

BM3D (PyPI `bm3d` 4.0.3) is the reference backend. Its licence is "free for non-commercial use"
with a closed binary, so the rest of the code sees only the `Denoiser` protocol and a name;
another backend (a GPU BM3D, say) can be added to `_BACKENDS` without touching the callers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from dicom_node.errors import ConfigurationError


class Denoiser(Protocol):
    name: str

    def __call__(self, image: np.ndarray, sigma: float) -> np.ndarray:
        """Estimate of the noise-free image, given additive white Gaussian noise of std `sigma`."""
        ...


class Bm3dDenoiser:
    """BM3D, profile 'np'; the Wiener stage (the default) follows hard thresholding.

    σ is passed as a scalar: with 'np' that avoids both the 'refilter' crash on scalars and the
    PSD code path, which calls `np.trapz` (removed in NumPy 2.4).
    """

    name = "bm3d"

    def __init__(self, wiener: bool = True) -> None:
        self.wiener = wiener

    def __call__(self, image: np.ndarray, sigma: float) -> np.ndarray:
        import bm3d  # imported lazily: loading the binary is slow and not always needed

        stage = bm3d.BM3DStages.ALL_STAGES if self.wiener else bm3d.BM3DStages.HARD_THRESHOLDING
        estimate = bm3d.bm3d(np.asarray(image, dtype=np.float64), float(sigma), profile="np", stage_arg=stage)
        return np.asarray(estimate, dtype=np.float64).reshape(np.shape(image))


_BACKENDS: dict[str, Callable[..., Denoiser]] = {"bm3d": Bm3dDenoiser}


def get_denoiser(name: str = "bm3d", **options: object) -> Denoiser:
    """The denoiser called `name`; options go to its constructor (e.g. wiener=False for BM3D)."""
    try:
        backend = _BACKENDS[name]
    except KeyError:
        raise ConfigurationError(f"unknown denoiser {name!r}; available: {', '.join(sorted(_BACKENDS))}") from None
    return backend(**options)
