"""The deep restorer: a trained network restores the breast's box, tiled; the rest is rescaled.

Two kinds of model (the card's `task`): "restore" maps the low-dose image to a full-dose one;
"denoise" is a GAT-domain denoiser run as the "CNN on VST" (Vimieiro et al.): GAT → network →
unbiased inverse → blend to full-dose noise, the model-based path's physics around the network.
Torch is imported inside the functions that need it, so registering this restorer (the registry
imports this module to list restorers) stays cheap and torch-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
from pydantic import Field

from dicom_node.errors import ConfigurationError
from dicom_node.restore.common import BreastBox, linear_rescale, mean_ratio, validated_input
from dicom_node.restore.deep.card import TASKS, ModelCard
from dicom_node.restore.deep.store import cached_model, default_model_dir, resolve_model, serves
from dicom_node.restore.deep.tiling import tiled_inference
from dicom_node.restore.device import select_device
from dicom_node.restore.noise import NoiseModel
from dicom_node.restore.normalisation import Normalisation
from dicom_node.restore.registry import (
    Environment,
    Provenance,
    Restoration,
    RestorerOptions,
    StageTimer,
    register_restorer,
)

if TYPE_CHECKING:
    import torch

_BOX_MARGIN = 32  # px of background context around the breast, as in the MB path


class DeepOptions(RestorerOptions):
    """A profile's choices for the deep restorer: the model ("" = the one for the dose), the blend
    after a denoising model ("" = the one it was made for), tiling."""

    model: str = ""
    blend: Literal["", "plain", "noise-aware", "spectral"] = ""  # empty, or one of blend.Blend (one flat
    #   literal: pydantic words a union of literals as two errors)
    tile: int = Field(512, gt=0)
    batch: int = Field(4, ge=1)


class DeepRestorer:
    """A trained network restores the image; its model card says how to normalise and for what dose.

    Without `model`, the model directory's model serving the requested dose fraction is used (the
    newest if several, of either task). A model trained for another dose fraction is refused: a
    network trained to restore 50 % dose would silently mis-restore a 25 % image.

    A denoising model runs inside gat-bm3d's pipeline (`GatBm3dRestorer` with the network as its
    denoiser), blended by `blend`: empty, "plain" for a model trained through it (loss "protocol"),
    else "spectral"; its QC figures are gat-bm3d's plus the two below.

    QC figures (`Restoration.qc`; NaN where undefined), besides the common ones every restoration
    gets (`dicom_node.restore.qc.image_qc`):
    - breast_fraction: fraction of the image inside the breast mask;
    - mean_ratio: restored mean / ((z − τ)/r) mean in the breast, offsets removed (≈1: unbiased);
    - dose_fraction_mismatch: |model's dose fraction − requested| (0, or the restore refuses);
    - model_dose_fraction: the dose fraction the model was trained for;
    - model_validation_<figure>: each number of the model card's validation figures (PSNR, SSIM,
      loss, …, as the trainer measured them on its held-out images), so a job names the quality
      its model was validated at.

    Timings (seconds): load (resolve, and read the model unless cached), normalise, inference,
    denormalise, qc, total.
    """

    name = "deep"

    def __init__(
        self,
        model: str | None = None,
        model_dir: Path | str | None = None,
        device: str = "auto",
        tile: int = 512,
        batch: int = 4,
        blend: str = "",
    ) -> None:
        self.model = model or None
        self.model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        self.device = select_device(device).type
        self.tile = tile
        self.batch = batch
        self.blend = blend
        if self.model:  # a missing or broken model, or a blend it cannot take, is said at start
            resolve_model(self.model_dir, self.model, None, TASKS)
            _, card = self._load(self.model)
            if blend and card.task != "denoise":
                raise ConfigurationError(f"blend is for denoising models; {self.model!r} restores end to end")

    def _load(self, name: str) -> tuple[torch.nn.Module, Any]:
        return cached_model(self.model_dir, name, self.device)

    def restore(self, raw: np.ndarray, noise: NoiseModel, dose_fraction: float) -> Restoration:
        raw = validated_input(raw, noise, dose_fraction)
        timer = StageTimer()
        lap = timer.lap
        name = resolve_model(self.model_dir, self.model, dose_fraction, TASKS)
        net, card = self._load(name)
        if not serves(card, dose_fraction):
            trained = "/".join(f"{dose:g}" for dose in card.dose_fractions)
            raise ConfigurationError(
                f"model {name!r} was trained for dose fraction {trained}, not {dose_fraction:g}; "
                f"choose a model for {dose_fraction:g} or leave the model unset to use the default"
            )
        if card.task == "denoise":
            return self._restore_on_vst(name, card, raw, noise, dose_fraction)
        model_dose = float(card.dose_fraction)
        normalisation = Normalisation.from_dict(card.normalisation)
        lap("load")
        # Like the MB path: the network sees the breast's bounding box (it was trained on breast
        # patches); the direct-exposure background outside it is rescaled linearly.
        radius = cast(int, net.receptive_field_radius)  # every network of the registry declares it
        breast = BreastBox.of(raw, noise, max(_BOX_MARGIN, radius))
        box_noise = breast.crop_noise(noise)
        image = linear_rescale(raw, noise, dose_fraction)
        x = normalisation.to_network(breast.crop(raw), box_noise, dose_fraction)
        lap("normalise")
        output = tiled_inference(net, x, tile=self.tile, batch=self.batch, device=self.device) if x.size else x
        lap("inference")
        if x.size:
            image[breast.rows, breast.cols] = normalisation.from_network(output, box_noise)
        lap("denormalise")
        qc = {
            **breast.qc(),
            "mean_ratio": mean_ratio(image, raw, noise, dose_fraction, breast.mask),
            "dose_fraction_mismatch": abs(model_dose - dose_fraction),
            "model_dose_fraction": model_dose,
            **validation_figures(card),
        }
        lap("qc")
        provenance = Provenance(
            method=self.name,
            device=self.device,
            options={"model": name},  # tiling changes nothing in the result
            model_name=name,
            model_digest=card.weights_sha256,
        )
        return Restoration(image=image, provenance=provenance, qc=qc, timings=timer.finish())

    def _restore_on_vst(
        self, name: str, card: ModelCard, raw: np.ndarray, noise: NoiseModel, dose_fraction: float
    ) -> Restoration:
        """A denoising model as the CNN on VST: gat-bm3d's pipeline with the network as its denoiser."""
        from dicom_node.restore.deep.denoiser import NetworkDenoiser
        from dicom_node.restore.gat_bm3d import GatBm3dRestorer  # imports this package: not at module level

        blend = self.blend or ("plain" if card.loss == "protocol" else "spectral")
        denoiser = NetworkDenoiser(name, self.model_dir, self.device, self.tile, self.batch)
        result = GatBm3dRestorer(denoiser=denoiser, blend=blend).restore(raw, noise, dose_fraction)
        provenance = Provenance(
            method=self.name,
            device=self.device,
            options={"model": name, "blend": blend, "noise": result.provenance.options["noise"]},
            model_name=name,
            model_digest=card.weights_sha256,
        )
        qc = {
            **result.qc,
            "dose_fraction_mismatch": 0.0,
            "model_dose_fraction": dose_fraction,
            **validation_figures(card),
        }
        return Restoration(image=result.image, provenance=provenance, qc=qc, timings=result.timings)


def validation_figures(card: ModelCard) -> dict[str, float]:
    """The card's numeric validation figures as QC figures, model_validation_<name>."""
    return {
        f"model_validation_{key}": float(value)
        for key, value in (card.validation or {}).items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch"
    }


@register_restorer("deep", DeepOptions)
def _create(options: DeepOptions, environment: Environment) -> DeepRestorer:
    return DeepRestorer(
        options.model or None, environment.model_dir, environment.device, options.tile, options.batch, options.blend
    )
