"""The raw-detector noise model shared by restoration, simulation and calibration.

Linear "FOR PROCESSING" data: z = y + τ + n with E[z|y] = y + τ and
var[z|y] = λ·y + σ_e²  (λ quantum gain, σ_e electronic noise std, τ offset; all in ADU).

The noise need not be white: a CsI detector spreads each quantum over neighbouring pixels. Its
correlation is kept as the kernel κ of the noise after the GAT (unit variance there): the
GAT-domain noise is κ ⊛ n with n white and ‖κ‖₂ = 1, so κ = δ (or None) is white noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dicom_node.errors import ConfigurationError


@dataclass(frozen=True)
class NoiseModel:
    gain: float | np.ndarray  # λ: scalar or per-pixel map (same shape as the image)
    electronic_noise: float  # σ_e: standard deviation in ADU
    offset: float  # τ in ADU
    kernel: np.ndarray | None = None  # κ: GAT-domain noise correlation, odd-sized, ‖κ‖₂ = 1; None: white

    def __post_init__(self) -> None:
        gain = np.asarray(self.gain, dtype=np.float64)
        if not np.all(np.isfinite(gain)) or np.any(gain <= 0):
            raise ConfigurationError("gain (λ) must be positive and finite")
        if not np.isfinite(self.electronic_noise) or self.electronic_noise < 0:
            raise ConfigurationError("electronic_noise (σ_e) must be a non-negative number")
        if not np.isfinite(self.offset):
            raise ConfigurationError("offset (τ) must be finite")
        if self.kernel is not None:
            kernel = np.asarray(self.kernel, dtype=np.float64)
            if kernel.ndim != 2 or kernel.shape[0] % 2 == 0 or kernel.shape[1] % 2 == 0:
                raise ConfigurationError(f"the noise kernel must be a 2-D array of odd sides, got shape {kernel.shape}")
            if not np.all(np.isfinite(kernel)) or abs(float(np.sum(kernel**2)) - 1.0) > 1e-3:
                raise ConfigurationError("the noise kernel must be finite with unit energy (sum of squares 1)")

    def variance(self, signal: np.ndarray) -> np.ndarray:
        """Expected variance of a raw pixel whose offset-free mean is `signal`."""
        return self.gain * np.maximum(signal, 0.0) + self.electronic_noise**2

    def crop(self, rows: slice, cols: slice) -> NoiseModel:
        """The same model restricted to a sub-image (crops a per-pixel gain map)."""
        if np.ndim(self.gain) == 0:
            return self
        return NoiseModel(np.asarray(self.gain)[rows, cols], self.electronic_noise, self.offset, self.kernel)
