"""A trained GAT-domain denoiser (a "denoise" model) behind the model-based path's `Denoiser` interface.

The network estimates the noise-free GAT-domain image from one with unit-variance noise (the
trainer's task "denoise"), so it can replace BM3D in gat-bm3d: the GAT keeps the noise level, the
unbiased inverse the mean, and the blend puts back full-dose noise. Two kinds of model:
- unconditioned (`conditions` 0): trained for one noise correlation (its card's neighbour
  correlation); a detector whose kernel correlates neighbours differently is refused, not mis-denoised;
- conditioned (FFDNet-like): it also reads the image's noise-level maps (`blend.noise_level_maps`:
  the level to land at, the noise's correlation), bound per image by `for_image`, and serves the
  doses and the range of correlations it was trained on.
Torch is imported when a model is loaded.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from dicom_node.errors import ConfigurationError
from dicom_node.restore.blend import noise_level_maps
from dicom_node.restore.calibration import kernel_neighbour_correlations
from dicom_node.restore.deep.store import cached_model, default_model_dir, resolve_model
from dicom_node.restore.deep.tiling import tiled_inference
from dicom_node.restore.device import select_device
from dicom_node.restore.noise import NoiseModel

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
        self.model = resolve_model(self.model_dir, model or None, None, tasks=("denoise",))
        self.device = select_device(device).type
        self.tile, self.batch = tile, batch
        _, card = cached_model(self.model_dir, self.model, self.device)
        self.digest = card.weights_sha256
        self.scale = card.normaliser.scale
        self.conditions = int(card.network_options.get("conditions", 0))
        trained = (card.noise_simulation or {}).get("neighbour_correlation") or {}
        if self.conditions:  # the range of mean neighbour correlations it was trained on
            self.correlation = (float(trained.get("lowest", 0.0)), float(trained.get("highest", 0.0)))
        else:  # the (vertical, horizontal) correlation it was trained for
            self.correlation = (float(trained.get("vertical", 0.0)), float(trained.get("horizontal", 0.0)))
        self.maps: np.ndarray | None = None  # bound by for_image (conditioned models)

    def for_image(self, gat_image: np.ndarray, noise: NoiseModel, dose_fraction: float) -> NetworkDenoiser:
        if not self.conditions:
            return self
        bound = copy.copy(self)
        bound.maps = noise_level_maps(gat_image, noise, dose_fraction)
        return bound

    def __call__(self, image: np.ndarray, sigma: float, kernel: np.ndarray | None = None) -> np.ndarray:
        if sigma != 1.0:
            raise ConfigurationError(f"denoising model {self.model!r} expects GAT-domain noise of std 1, not {sigma:g}")
        self._check_correlation(kernel)
        net, _ = cached_model(self.model_dir, self.model, self.device)
        x = (np.asarray(image, dtype=np.float64) / self.scale).astype(np.float32)
        if self.conditions:
            if self.maps is None or self.maps.shape[1:] != x.shape:
                raise ConfigurationError(
                    f"denoising model {self.model!r} reads noise-level maps: bind them with for_image first"
                )
            x = np.concatenate([x[None], self.maps])
        output = tiled_inference(net, x, tile=self.tile, batch=self.batch, device=self.device)
        return np.asarray(output, dtype=np.float64) * self.scale

    def _check_correlation(self, kernel: np.ndarray | None) -> None:
        given = kernel_neighbour_correlations(kernel)
        if self.conditions:
            lowest, highest = self.correlation
            mean = float(np.mean(given))
            if lowest - _CORRELATION_TOLERANCE <= mean <= highest + _CORRELATION_TOLERANCE:
                return
            raise ConfigurationError(
                f"denoising model {self.model!r} was trained for noise whose neighbours correlate by "
                f"{lowest:.2f} to {highest:.2f}; this detector's kernel gives {mean:.2f}: train one for it"
            )
        if max(abs(a - b) for a, b in zip(given, self.correlation, strict=True)) > _CORRELATION_TOLERANCE:
            raise ConfigurationError(
                f"denoising model {self.model!r} was trained for noise whose neighbours correlate by "
                f"{self.correlation[0]:.2f}/{self.correlation[1]:.2f} (vertical/horizontal); this detector's "
                f"kernel gives {given[0]:.2f}/{given[1]:.2f}: train one for it"
            )
