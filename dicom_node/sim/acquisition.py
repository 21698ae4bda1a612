"""The detector: a noise-free signal becomes a raw frame, X = γY + noise, var = γλY + σ_e².

Quantum noise is drawn physically, as λ times a Poisson count of γY/λ quanta (so it is
Poisson–Gaussian, not a Gaussian approximation, at low counts too); electronic noise is white
Gaussian; the offset τ is added and the result rounded and clipped to the stored bits.
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


def acquire(
    signal: np.ndarray,
    noise: NoiseModel,
    dose_fraction: float = 1.0,
    rng_or_seed: np.random.Generator | int | None = None,
    bits_stored: int = 14,
    crosstalk: float = 0.0,
) -> np.ndarray:
    """One raw acquisition (uint16) of the full-dose signal `signal` (ADU above τ) at `dose_fraction`.

    `crosstalk` > 0 correlates the quantum noise between neighbouring pixels (CsI-like) without
    changing its variance; 0 gives the nearly white noise of a-Se detectors.
    """
    if not 0 < dose_fraction <= 1:
        raise ValueError(f"dose fraction must be in (0, 1], got {dose_fraction}")
    rng = np.random.default_rng(rng_or_seed)
    gain = np.asarray(noise.gain, dtype=np.float64)
    mean = dose_fraction * np.maximum(np.asarray(signal, dtype=np.float64), 0.0)
    quantum = gain * rng.poisson(mean / gain) - mean
    if crosstalk:
        quantum = ndimage.convolve(quantum, crosstalk_kernel(crosstalk), mode="reflect")
    electronic = rng.normal(0.0, noise.electronic_noise, mean.shape)
    raw = np.rint(mean + quantum + electronic + noise.offset)
    return np.clip(raw, 0, 2**bits_stored - 1).astype(np.uint16)
