"""The detector: a noise-free signal becomes a raw frame, X = γY + noise, var = γλY + σ_e².

Quantum noise is drawn physically, as λ times a Poisson count of γY/λ quanta (so it is
Poisson–Gaussian, not a Gaussian approximation, at low counts too); electronic noise is white
Gaussian; the offset τ is added and the result rounded and clipped to the stored bits.

The quantum noise may be spatially correlated (a CsI detector spreads each quantum over its
neighbours): it is convolved with a kernel K of unit energy (‖K‖₂ = 1), which keeps its variance
and gives it the autocorrelation K ⋆ K. The kernel is the one `NoiseModel.kernel` holds (the
GAT-domain noise correlation κ): the GAT whitens the quantum noise's level, not its correlation,
so at breast-like signal levels (quantum noise ≫ σ_e) the GAT-domain noise of a frame acquired
with K is κ = K. The electronic noise stays white.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from dicom_node.restore.noise import NoiseModel


def crosstalk_kernel(strength: float) -> np.ndarray:
    """3×3 kernel spreading each quantum's signal to its neighbours, ‖K‖₂ = 1 (variance kept)."""
    if not 0 <= strength <= 1:
        raise ValueError(f"crosstalk must be in [0, 1], got {strength}")
    k = np.array(
        [[strength**2, strength, strength**2], [strength, 1.0, strength], [strength**2, strength, strength**2]]
    )
    return k / np.sqrt(np.sum(k**2))


def gaussian_kernel(sigma_px: float, radius: int | None = None) -> np.ndarray:
    """Isotropic Gaussian kernel exp(−r²/2σ²) of side 2·radius + 1, ‖K‖₂ = 1 (variance kept).

    Noise convolved with it has the autocorrelation of a Gaussian of σ·√2: neighbour correlation
    exp(−1/4σ²) for σ ≥ 1 px, 0.78 at 1 px and 0.94 at 2 px (strong, CsI-like); sampled finer, 0.26
    at σ = 0.5 px (moderate; `crosstalk_kernel(0.5)` gives 0.64). `radius` defaults to ⌈3σ⌉ (the
    energy beyond is < 10⁻⁷); σ = 0 gives the 1×1 identity (white noise).
    """
    if not np.isfinite(sigma_px) or sigma_px < 0:
        raise ValueError(f"sigma_px must be a non-negative number, got {sigma_px}")
    if radius is None:
        radius = int(np.ceil(3 * sigma_px))
    if radius < 0:
        raise ValueError(f"radius must be non-negative, got {radius}")
    if sigma_px == 0:
        k = np.zeros((2 * radius + 1, 2 * radius + 1))
        k[radius, radius] = 1.0
        return k
    r = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma_px**2))
    return k / np.sqrt(np.sum(k**2))


def noise_kernel(kernel: np.ndarray) -> np.ndarray:
    """`kernel` checked as a noise-correlation kernel: 2-D (leading axes of size 1 are dropped, so
    a [1, k, k] kernel for a stack of frames is accepted too), odd sides, finite, unit energy
    (within 10⁻³, like `NoiseModel`; then renormalised exactly). ValueError otherwise."""
    k = np.asarray(kernel, dtype=np.float64)
    while k.ndim > 2 and k.shape[0] == 1:
        k = k[0]
    if k.ndim != 2 or k.shape[0] % 2 == 0 or k.shape[1] % 2 == 0:
        raise ValueError(f"a noise kernel must be 2-D with odd sides, got shape {np.shape(kernel)}")
    energy = float(np.sum(k**2))
    if not np.all(np.isfinite(k)) or abs(energy - 1.0) > 1e-3:
        raise ValueError(f"a noise kernel must be finite with unit energy (sum of squares 1), got {energy:.4g}")
    return k / np.sqrt(energy)


def correlate_noise(noise: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """White `noise` convolved with a (checked) 2-D `kernel` over its last two axes, frame by frame
    for a stack [..., row, column]; edges reflected."""
    k = noise_kernel(kernel)
    if k.shape == (1, 1):
        return noise * k[0, 0]
    return ndimage.convolve(noise, k.reshape((1,) * (noise.ndim - 2) + k.shape), mode="reflect")


def acquire(
    signal: np.ndarray,
    noise: NoiseModel,
    dose_fraction: float = 1.0,
    rng_or_seed: np.random.Generator | int | None = None,
    bits_stored: int = 14,
    crosstalk: float | None = None,
    kernel: np.ndarray | None = None,
) -> np.ndarray:
    """One raw acquisition (uint16) of the full-dose signal `signal` (ADU above τ) at `dose_fraction`.

    The quantum noise is correlated by `kernel` (any odd-sized 2-D kernel of unit energy, e.g.
    `gaussian_kernel`), or by `crosstalk_kernel(crosstalk)` (3×3, CsI-like; 0 is white), without
    changing its variance. Give at most one of the two; with neither, the detector's own
    `noise.kernel` is used (white when it has none). `crosstalk=0` forces white noise.
    """
    if not 0 < dose_fraction <= 1:
        raise ValueError(f"dose fraction must be in (0, 1], got {dose_fraction}")
    if crosstalk is not None and kernel is not None:
        raise ValueError("give either crosstalk or kernel, not both")
    if crosstalk is not None:
        kernel = crosstalk_kernel(crosstalk)
    elif kernel is None:
        kernel = noise.kernel
    rng = np.random.default_rng(rng_or_seed)
    gain = np.asarray(noise.gain, dtype=np.float64)
    mean = dose_fraction * np.maximum(np.asarray(signal, dtype=np.float64), 0.0)
    quantum = gain * rng.poisson(mean / gain) - mean
    if kernel is not None:
        quantum = correlate_noise(quantum, kernel)
    electronic = rng.normal(0.0, noise.electronic_noise, mean.shape)
    raw = np.rint(mean + quantum + electronic + noise.offset)
    return np.clip(raw, 0, 2**bits_stored - 1).astype(np.uint16)
