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
SMALLEST_D = 0.838
_SQRT_3_2 = float(np.sqrt(1.5))


def gat_forward(z: np.ndarray, noise: NoiseModel) -> np.ndarray:
    """f(z) = (2/λ)·sqrt(max(0, λ(z − τ) + (3/8)λ² + σ_e²)); λ may be a per-pixel map."""
    gain = np.asarray(noise.gain, dtype=np.float64)
    signal = np.asarray(z, dtype=np.float64) - noise.offset
    radicand = gain * signal + 0.375 * gain**2 + noise.electronic_noise**2
    return (2.0 / gain) * np.sqrt(np.maximum(radicand, 0.0))


def gat_inverse(d: np.ndarray, noise: NoiseModel) -> np.ndarray:
    """Unbiased inverse of `gat_forward` for a denoised D, returned as raw values λ·I + τ."""
    gain = np.asarray(noise.gain, dtype=np.float64)
    d = np.maximum(np.asarray(d, dtype=np.float64), SMALLEST_D)
    electronic_in_counts = (noise.electronic_noise / gain) ** 2  # σ̃² = (σ_e/λ)²
    return gain * np.maximum(unbiased_counts(d, electronic_in_counts), 0.0) + noise.offset


def unbiased_counts(d, electronic_in_counts):
    """The closed-form exact unbiased inverse in counts, before clamping at 0: arithmetic only, so
    NumPy arrays and torch tensors alike (the trainer's protocol loss differentiates through it).
    `d` ≥ SMALLEST_D."""
    return d**2 / 4 + 0.25 * _SQRT_3_2 / d - 1.375 / d**2 + 0.625 * _SQRT_3_2 / d**3 - 0.125 - electronic_in_counts


def gat_expectation(signal: np.ndarray, noise: NoiseModel, iterations: int = 60) -> np.ndarray:
    """E[f(z)] for raw data of offset-free mean `signal`: the GAT-domain value `gat_inverse` maps to it.

    The exact unbiased inverse is defined by I(E[f(z)]) = E[z]; solving it (bisection: the inverse
    is monotone above its clamp) gives the noise-free target a GAT-domain denoiser must estimate,
    so that its output goes back through `gat_inverse` without bias.
    """
    target = np.maximum(np.asarray(signal, dtype=np.float64), 0.0) + noise.offset
    low = np.full(target.shape, SMALLEST_D)
    high = gat_forward(target, noise) + 2.0  # f(E z) ≥ E f(z) − a small Jensen gap, well under 2
    for _ in range(iterations):
        middle = (low + high) / 2
        below = gat_inverse(middle, noise) < target
        low = np.where(below, middle, low)
        high = np.where(below, high, middle)
    return (low + high) / 2
