"""Generalized Anscombe transform (GAT): Poisson–Gaussian raw data ↔ unit-variance Gaussian.

The forward transform makes the noise of raw data (var = λ·y + σ_e²) approximately Gaussian with
std 1, so a white-noise denoiser (BM3D, σ = 1) can be used. The inverse is the closed-form
approximation of the exact unbiased inverse (Mäkitalo & Foi): the naive algebraic inverse is
biased at low counts because E[f(z)] ≠ f(E[z]).
"""

from __future__ import annotations

import numpy as np

from dicom_node.restore.noise import NoiseModel

# The closed-form inverse has its minimum here (I ≈ −0.24 < 0); clamping D to it keeps the
# inverse monotone instead of letting the D⁻³ term blow up for tiny D.
_SMALLEST_D = 0.838
_SQRT_3_2 = np.sqrt(1.5)


def gat_forward(z: np.ndarray, noise: NoiseModel) -> np.ndarray:
    """f(z) = (2/λ)·sqrt(max(0, λ(z − τ) + (3/8)λ² + σ_e²)); λ may be a per-pixel map."""
    gain = np.asarray(noise.gain, dtype=np.float64)
    signal = np.asarray(z, dtype=np.float64) - noise.offset
    radicand = gain * signal + 0.375 * gain**2 + noise.electronic_noise**2
    return (2.0 / gain) * np.sqrt(np.maximum(radicand, 0.0))


def gat_inverse(d: np.ndarray, noise: NoiseModel) -> np.ndarray:
    """Unbiased inverse of `gat_forward` for a denoised D, returned as raw values λ·I + τ."""
    gain = np.asarray(noise.gain, dtype=np.float64)
    d = np.maximum(np.asarray(d, dtype=np.float64), _SMALLEST_D)
    electronic_in_counts = (noise.electronic_noise / gain) ** 2  # σ̃² = (σ_e/λ)²
    counts = d**2 / 4 + 0.25 * _SQRT_3_2 / d - 1.375 / d**2 + 0.625 * _SQRT_3_2 / d**3 - 0.125 - electronic_in_counts
    return gain * np.maximum(counts, 0.0) + noise.offset
