"""How raw pixels become network inputs and network outputs become raw pixels.

The trainer records a `Normalisation` in each model card and the deep restorer applies the same
one at inference, so the two can never drift apart. Two domains, as in the seed papers:

- "raw": x = (z − τ)/(r·S): offset removed (better than the seed's plain x/8000/r) and the
  low-dose signal brought to the full-dose scale; the network's output o gives o·S + τ.
- "anscombe": x = GAT(z)/S (the noise is white with unit variance there, seed 001's ResNet-AT);
  the output o is mapped back by the exact unbiased inverse of o·S.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from dicom_node.errors import ConfigurationError
from dicom_node.restore.gat import gat_expectation, gat_forward, gat_inverse
from dicom_node.restore.noise import NoiseModel


@dataclass(frozen=True)
class Normalisation:
    domain: Literal["raw", "anscombe"] = "raw"
    scale: float = 8000.0

    def __post_init__(self) -> None:
        if self.domain not in ("raw", "anscombe"):
            raise ConfigurationError(f"unknown normalisation domain {self.domain!r} (raw or anscombe)")
        if not self.scale > 0:
            raise ConfigurationError("normalisation scale must be positive")

    def to_network(self, raw: np.ndarray, noise: NoiseModel, dose_fraction: float) -> np.ndarray:
        """Network input (float32) for a raw image at `dose_fraction` of the target dose."""
        raw = np.asarray(raw, dtype=np.float64)
        if self.domain == "raw":
            x = (raw - noise.offset) / (dose_fraction * self.scale)
        else:
            x = gat_forward(raw, noise) / self.scale
        return x.astype(np.float32)

    def target(self, raw_full_dose: np.ndarray, noise: NoiseModel) -> np.ndarray:
        """Training target (float32) from a full-dose raw image."""
        return self.to_network(raw_full_dose, noise, 1.0)

    def clean_target(self, signal: np.ndarray, noise: NoiseModel, dose_fraction: float) -> np.ndarray:
        """A GAT-domain denoiser's target (float32): the noise-free GAT-domain expectation of an
        acquisition at `dose_fraction` of the offset-free `signal` (anscombe domain only)."""
        if self.domain != "anscombe":
            raise ConfigurationError("a denoiser's target is GAT-domain: it needs the anscombe normalisation")
        expectation = gat_expectation(dose_fraction * np.asarray(signal, dtype=np.float64), noise)
        return (expectation / self.scale).astype(np.float32)

    def from_network(self, output: np.ndarray, noise: NoiseModel) -> np.ndarray:
        """Raw full-dose image (float64, offset kept) from a network output."""
        output = np.asarray(output, dtype=np.float64) * self.scale
        if self.domain == "raw":
            return output + noise.offset
        return gat_inverse(output, noise)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Normalisation:
        return cls(**data)
