"""Dose-reduction simulation: a full-dose raw image becomes a realistic lower-dose one.

Noise is injected in the Anscombe domain (Borges et al. 2016/2017), where it is signal
independent, then mapped back; the electronic part is topped up separately. The target
statistics (checked in the tests) are E[z_LD] = γy + τ and var[z_LD] = λγy + σ_e².

The injected noise is s·(n ⊛ K) (science.md, step 3). K is the detector's GAT-domain noise
correlation κ (`NoiseModel.kernel`), so the low-dose image's noise is correlated like the
full-dose image's own; the same kernel forms as `dicom_node.sim.acquisition.acquire` take.
"""

from __future__ import annotations

import numpy as np

from dicom_node.restore.noise import NoiseModel
from dicom_node.sim.acquisition import correlate_noise


def simulate_dose_reduction(
    z_full: np.ndarray,
    noise: NoiseModel,
    dose_fraction: float,
    rng_or_seed: np.random.Generator | int | None = None,
    kernel: np.ndarray | None = None,
) -> np.ndarray:
    """A raw image (float64, offset kept) at `dose_fraction` of `z_full`'s dose.

    `z_full` is one image [row, column] or a stack [..., row, column] (each frame is its own image).
    `kernel` correlates the injected noise: an odd-sized 2-D kernel of unit energy (a [1, k, k]
    one is accepted too), applied over the last two axes. None: the detector's own `noise.kernel`
    (white when it has none); a 1×1 kernel forces white noise.
    """
    if not 0 < dose_fraction <= 1:
        raise ValueError(f"dose fraction must be in (0, 1], got {dose_fraction}")
    if kernel is None:
        kernel = noise.kernel
    rng = np.random.default_rng(rng_or_seed)
    gamma = dose_fraction
    y = np.asarray(z_full, dtype=np.float64) - noise.offset
    s2 = 1.0 / gamma - 1.0
    c1 = 1.0 / np.asarray(noise.gain, dtype=np.float64)
    c2 = -s2 / 8.0
    injected = rng.standard_normal(y.shape)
    if kernel is not None:
        injected = correlate_noise(injected, kernel)
    anscombe = 2.0 * np.sqrt(np.maximum(0.0, c1 * y + c2)) + np.sqrt(s2) * injected
    y_quantum = gamma * (anscombe**2 / 4.0 - c2 - s2 / 4.0) / c1
    # Scaling by γ left γ²σ_e² of electronic variance; top it up to σ_e² (not by 1 − γ).
    electronic = np.sqrt(1.0 - gamma**2) * noise.electronic_noise * rng.standard_normal(y.shape)
    return y_quantum + electronic + noise.offset
