"""A trained GAT-domain denoiser (a "denoise" model) behind the model-based path's `Denoiser` interface.

The network estimates the noise-free GAT-domain image from one with unit-variance noise (the
trainer's task "denoise": targets are the exact GAT-domain expectation of the truth), so it can
replace BM3D in gat-bm3d: the GAT keeps the noise level, the unbiased inverse the mean, and the
blend puts back full-dose noise. It was trained for one noise correlation (its card's neighbour
correlation); a detector whose kernel correlates neighbours differently is refused, not mis-denoised.
Torch is imported when a model is loaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dicom_node.errors import ConfigurationError
from dicom_node.restore.calibration import kernel_neighbour_correlations
from dicom_node.restore.deep.store import cached_model, default_model_dir, resolve_model
from dicom_node.restore.deep.tiling import tiled_inference
from dicom_node.restore.device import select_device

_CORRELATION_TOLERANCE = 0.1  # |neighbour correlation of the detector's κ − the model's| accepted


class NetworkDenoiser:
    """`model` ("" = the newest "denoise" model in `model_dir`), loaded and checked at construction."""

    name = "network"

    def __init__(
        self,
        model: str = "",
        model_dir: Path | str | None = None,
        device: str = "auto",
        tile: int = 512,
        batch: int = 4,
    ) -> None:
        self.model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        self.model = resolve_model(self.model_dir, model or None, None, task="denoise")
        self.device = select_device(device).type
        self.tile, self.batch = tile, batch
        _, card = cached_model(self.model_dir, self.model, self.device)
        self.digest = card.weights_sha256
        self.scale = card.normaliser.scale
        trained = (card.noise_simulation or {}).get("neighbour_correlation") or {}
        self.correlation = (float(trained.get("vertical", 0.0)), float(trained.get("horizontal", 0.0)))

    def __call__(self, image: np.ndarray, sigma: float, kernel: np.ndarray | None = None) -> np.ndarray:
        if sigma != 1.0:
            raise ConfigurationError(f"denoising model {self.model!r} expects GAT-domain noise of std 1, not {sigma:g}")
        given = kernel_neighbour_correlations(kernel)
        if max(abs(a - b) for a, b in zip(given, self.correlation, strict=True)) > _CORRELATION_TOLERANCE:
            raise ConfigurationError(
                f"denoising model {self.model!r} was trained for noise whose neighbours correlate by "
                f"{self.correlation[0]:.2f}/{self.correlation[1]:.2f} (vertical/horizontal); this detector's "
                f"kernel gives {given[0]:.2f}/{given[1]:.2f}: train one for it"
            )
        net, _ = cached_model(self.model_dir, self.model, self.device)
        x = (np.asarray(image, dtype=np.float64) / self.scale).astype(np.float32)
        output = tiled_inference(net, x, tile=self.tile, batch=self.batch, device=self.device)
        return np.asarray(output, dtype=np.float64) * self.scale
