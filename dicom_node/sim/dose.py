"""Dose-reduction simulation: a full-dose raw image becomes a realistic lower-dose one.

Noise is injected in the Anscombe domain (Borges et al. 2016/2017), where it is signal
independent, then mapped back; the electronic part is topped up separately. The target
statistics (checked in the tests) are E[z_LD] = γy + τ and var[z_LD] = λγy + σ_e².
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from dicom_node.restore.noise import NoiseModel


def simulate_dose_reduction(
    z_full: np.ndarray,
    noise: NoiseModel,
    dose_fraction: float,
    rng_or_seed: np.random.Generator | int | None = None,
    kernel: np.ndarray | None = None,
) -> np.ndarray:
    """A raw image (float64, offset kept) at `dose_fraction` of `z_full`'s dose.

    `kernel` (‖K‖₂ = 1) correlates the injected quantum noise like the detector's own; None: white.
    """
    if not 0 < dose_fraction <= 1:
        raise ValueError(f"dose fraction must be in (0, 1], got {dose_fraction}")
    rng = np.random.default_rng(rng_or_seed)
    gamma = dose_fraction
    y = np.asarray(z_full, dtype=np.float64) - noise.offset
    s2 = 1.0 / gamma - 1.0
    c1 = 1.0 / np.asarray(noise.gain, dtype=np.float64)
    c2 = -s2 / 8.0
    injected = rng.standard_normal(y.shape)
    if kernel is not None:
        injected = ndimage.convolve(injected, kernel / np.sqrt(np.sum(kernel**2)), mode="reflect")
    anscombe = 2.0 * np.sqrt(np.maximum(0.0, c1 * y + c2)) + np.sqrt(s2) * injected
    y_quantum = gamma * (anscombe**2 / 4.0 - c2 - s2 / 4.0) / c1
    # Scaling by γ left γ²σ_e² of electronic variance; top it up to σ_e² (not by 1 − γ).
    electronic = np.sqrt(1.0 - gamma**2) * noise.electronic_noise * rng.standard_normal(y.shape)
    return y_quantum + electronic + noise.offset
