"""Gaussian-noise denoisers (white or stationary correlated noise) behind one small interface.

BM3D (PyPI `bm3d` 4.0.3) is the reference backend. Its licence is "free for non-commercial use"
with a closed binary, so the rest of the code sees only the `Denoiser` protocol and a name;
"network" is a trained GAT-domain denoiser (the trainer's task "denoise"); another backend (a GPU
BM3D, say) can be added to `_BACKENDS` without touching the callers.

The noise is σ·(κ ⊛ n) with n white and κ the unit-energy correlation kernel (None: white, as
`NoiseModel.kernel`). BM3D takes correlated noise as its power spectrum (`noise_psd`).

NumPy ≥ 2.4 and the spectrum: `bm3d` 4.0.3 and `bm4d` 4.2.5 (their newest releases) estimate
their thresholds from a PSD argument with `np.trapz`, which NumPy 2.4 removed (AttributeError).
Of the three workarounds (science.md) this module installs the alias `np.trapz = np.trapezoid`
(`_provide_np_trapz`), because:
- pinning NumPy < 2.4 would hold the whole project (torch, scipy, the other engineers' code) back
  for one call in one backend, and this environment already has NumPy 2.4;
- explicit thresholds (`lambda_thr3d`, `mu2`) skip the estimation and lose exactly what the
  spectrum is for: thresholds tuned to the noise's spectrum;
- the alias is the function `np.trapz` was (NumPy 2.0 renamed it, same signature and result),
  and the licence forbids shipping a patched copy of bm4d, so it cannot be fixed there.
It is kept narrow: installed only when `np.trapz` is absent (NumPy < 2.4 keeps its own), only on
the spectrum path (the scalar-σ path never reaches `np.trapz`), never removed (idempotent and
thread-safe: a single attribute assignment). Its side effect is that `np.trapz` then exists in
this process; nothing in this project uses it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from dicom_node.errors import ConfigurationError, InputRefused
from dicom_node.restore.noise import NoiseModel


class Denoiser(Protocol):
    name: str

    def __call__(self, image: np.ndarray, sigma: float, kernel: np.ndarray | None = None) -> np.ndarray:
        """Estimate of the noise-free image, given additive Gaussian noise σ·(κ ⊛ n), n white.

        `kernel` is κ, the noise's correlation kernel with unit energy (‖κ‖₂ = 1, so σ is the
        noise's std); None means white noise.
        """
        ...

    def for_image(self, gat_image: np.ndarray, noise: NoiseModel, dose_fraction: float) -> Denoiser:
        """The denoiser to use on `gat_image` (and on probes around it): a conditioned network binds
        the image's noise-level maps (`blend.noise_level_maps`); BM3D needs nothing and returns itself."""
        ...


def noise_psd(kernel: np.ndarray, shape: tuple[int, ...], sigma: float = 1.0) -> np.ndarray:
    """Power spectrum of the noise σ·(κ ⊛ n) on an image of `shape`, in `bm3d.bm3d`'s convention.

    psd = |fft2(κ, shape)|²·N·σ² (N pixels): the expected |fft2(noise)|² of circular noise. This
    is bm3d's own convention: a scalar σ becomes ones(shape)·N·σ² inside bm4d (so κ = δ gives the
    same PSD), bm4d turns its own kernels back into PSDs as |fftn(kernel)|²·N (`_process_psd`),
    and the package's examples build PSDs as |fft2(kernel, shape)|²·N with ‖kernel‖₂ = σ. Where κ
    sits in the array does not matter (|·|² ignores the phase of a shift). κ is renormalised to
    unit energy: σ alone sets the level.
    """
    kernel = np.asarray(kernel, dtype=np.float64)
    rows, cols = int(shape[0]), int(shape[1])
    if kernel.ndim != 2:
        raise ConfigurationError(f"the noise kernel must be 2-D, got shape {kernel.shape}")
    energy = float(np.sum(kernel**2))
    if not np.isfinite(energy) or energy <= 0:
        raise ConfigurationError("the noise kernel must be finite and not all zero")
    if kernel.shape[0] > rows or kernel.shape[1] > cols:
        raise InputRefused(f"the image ({rows}×{cols} px) is smaller than the noise kernel {kernel.shape}")
    return np.abs(np.fft.fft2(kernel / np.sqrt(energy), s=(rows, cols))) ** 2 * (rows * cols) * float(sigma) ** 2


def _provide_np_trapz() -> None:
    """Make `np.trapz` exist for bm4d's threshold estimation on NumPy ≥ 2.4 (module docstring)."""
    if not hasattr(np, "trapz"):  # NumPy ≥ 2.4 removed it; older NumPy keeps its own
        np.trapz = np.trapezoid  # type: ignore[attr-defined]


class Bm3dDenoiser:
    """BM3D, profile 'np'; the Wiener stage (the default) follows hard thresholding.

    White noise (kernel None) is passed as a scalar σ. Correlated noise is passed as its power
    spectrum (`noise_psd`), with which BM3D shrinks each transform coefficient by its own noise
    variance and tunes its thresholds to the spectrum. Profile 'np' either way: 'refilter' crashes
    on a scalar and sets mu2_re wrongly (science.md).
    """

    name = "bm3d"

    def __init__(self, wiener: bool = True) -> None:
        self.wiener = wiener

    def for_image(self, gat_image: np.ndarray, noise: NoiseModel, dose_fraction: float) -> Bm3dDenoiser:
        return self

    def __call__(self, image: np.ndarray, sigma: float, kernel: np.ndarray | None = None) -> np.ndarray:
        import bm3d  # imported lazily: loading the binary is slow and not always needed

        image = np.asarray(image, dtype=np.float64)
        stage = bm3d.BM3DStages.ALL_STAGES if self.wiener else bm3d.BM3DStages.HARD_THRESHOLDING
        noise: float | np.ndarray = float(sigma)
        if kernel is not None:
            noise = noise_psd(kernel, image.shape, sigma)
            _provide_np_trapz()
        estimate = bm3d.bm3d(image, noise, profile="np", stage_arg=stage)
        return np.asarray(estimate, dtype=np.float64).reshape(image.shape)


def _network_denoiser(**options: object) -> Denoiser:
    """A trained GAT-domain network (`dicom_node.restore.deep.denoiser`; torch loads with it)."""
    from dicom_node.restore.deep.denoiser import NetworkDenoiser

    return NetworkDenoiser(**options)  # type: ignore[arg-type]


_BACKENDS: dict[str, Callable[..., Denoiser]] = {"bm3d": Bm3dDenoiser, "network": _network_denoiser}


def get_denoiser(name: str = "bm3d", **options: object) -> Denoiser:
    """The denoiser called `name`; options go to its constructor (e.g. wiener=False for BM3D)."""
    try:
        backend = _BACKENDS[name]
    except KeyError:
        raise ConfigurationError(f"unknown denoiser {name!r}; available: {', '.join(sorted(_BACKENDS))}") from None
    return backend(**options)
