"""Model-based restoration: GAT → BM3D → unbiased inverse → blend with the low-dose image.

Denoising alone would give a noise-free image, which is not what a full-dose acquisition looks
like; the blend puts back exactly the noise of a real target-dose image, element-wise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from dicom_node.errors import ConfigurationError
from dicom_node.restore.blend import (
    BLEND_MODES,
    SPECTRAL_PROBES,
    Blend,
    blend_weights,
    combine,
    estimate_noise_statistics,
    probe_responses,
    spectral_blend,
)
from dicom_node.restore.calibration import check_noise_correlation
from dicom_node.restore.common import BreastBox, linear_rescale, mean_ratio, validated_input
from dicom_node.restore.deep.denoiser import NetworkDenoiser
from dicom_node.restore.denoisers import Denoiser, get_denoiser
from dicom_node.restore.gat import gat_forward, gat_inverse
from dicom_node.restore.noise import NoiseModel
from dicom_node.restore.registry import (
    Environment,
    Provenance,
    Restoration,
    RestorerOptions,
    StageTimer,
    register_restorer,
)

_MIN_MARGIN = 32  # px of context around the breast: BM3D's blocks and search window fit inside


class GatBm3dOptions(RestorerOptions):
    """A profile's choices for gat-bm3d (see `GatBm3dRestorer`): the blend, and the denoiser —
    BM3D, or a trained GAT-domain network ("network"; `model` names it, empty: the newest
    "denoise" model in the node's model directory)."""

    blend: Blend = "spectral"
    margin: int = Field(_MIN_MARGIN, ge=_MIN_MARGIN)
    denoiser: Literal["bm3d", "network"] = "bm3d"
    model: str = ""

    @model_validator(mode="after")
    def _model_for_network(self) -> GatBm3dOptions:
        if self.model and self.denoiser != "network":
            raise ValueError('model names a denoising network: it needs denoiser = "network"')
        return self


class GatBm3dRestorer:
    """GAT → denoise (σ = 1) on the breast's bounding box → unbiased inverse → blend.

    The denoiser is BM3D, or a trained GAT-domain network (denoiser="network", a "denoise" model
    of the trainer, `dicom_node.restore.deep.denoiser`); provenance names the model and its digest.
    The denoiser is told the noise's correlation whenever the noise model has a kernel κ (the
    GAT-domain correlation of a CsI-like detector): BM3D then gets the noise spectrum instead of
    a white σ, and the blends' probes are coloured the same way. Provenance records
    which: options["noise"] is "coloured" or "white". Measured on 224×176 synthetic phantoms at
    r = 0.5 (70 µm pitch, GAT-domain κ measured from flat fields):
    - 3×3 crosstalk 0.5 (strong; tests/test_mb_phantom.py): plain blend RN 1.92× → 1.83× full
      dose, B² 0.64 → 0.53 %, calcification contrast 0.997 → 0.996; noise-aware RN 1.76× → 1.41×,
      B² 3.0 → 3.9 % (the full-dose level stays out of reach: most of this noise is low-frequency,
      which no denoiser removes).
    - Gaussian crosstalk σ 0.5 px (moderate): plain RN 1.74× → 1.66×, B² 0.35 → 0.52 %; noise-aware
      RN 1.28× → 1.04× (white probes on the same BM3D: 1.16×), B² 3.0 → 4.9 %.
    The spectrum lowers the noise; B² may rise or fall (science.md saw it rise 2.4×): watch B² and
    calcification contrast when a kernel is configured.

    The blend covers the whole bounding box (the breast plus ≥ 32 px of background), so the
    change to the linear rescale (z − τ)/r + τ used outside it happens in the background, away
    from tissue and from BM3D's own edge effects; no transition zone is needed.

    blend="spectral" (default) reaches the full-dose noise level with the least bias a blend can
    buy from this estimate (`spectral_blend`): one probe (two extra denoiser calls) measures the
    estimate's own noise and its covariance with the input per frequency, and the weights per
    frequency meet the full-dose variance at the smallest bias. On an unseen 256×208 phantom
    (Hologic-like, white noise, r = 0.5; docs/robustness.md) RN 0.97× FD, B² 3.1 % (plain: RN
    1.64×, B² 0.34 %), MNSE 1.26× FD (plain 1.67×), calcification contrast 0.99. The bias is the
    texture the denoiser removes: reaching full-dose noise means giving its estimate most of the
    weight, and BM3D keeps most of the low-frequency noise (its leftover is 0.9× the input's there,
    0.2× at the highest frequencies), so the noise can only be cut where the texture is. Where the
    estimate alone is already noisier than full dose (low gain, correlated noise, r = 0.25) no
    blend reaches it (a trained denoiser, denoiser="network", often does): the
    least-noise mix is used and the QC figure predicted_noise_ratio says by how much it misses.
    blend="noise-aware" measures the same statistics per pixel (two probes) and solves one
    weight per pixel: the same noise and bias within a few per cent on the phantoms compared, at
    5/3 of the spectral blend's time.
    blend="plain" is science.md's blend: it assumes a noise-free estimate, so on textured breasts
    the output stays noisier than a full-dose image (RN ≈ 1.5–1.9× at r = 0.5) with the smallest
    bias (B² ≈ 0.3–1 %); it is kept to compare against. Chosen per profile. docs/robustness.md has
    every figure.

    QC figures (`Restoration.qc`; NaN where undefined, e.g. no breast found or r = 1), besides the
    common ones every restoration gets (`dicom_node.restore.qc.image_qc`, docs/qc.md):
    - breast_fraction: fraction of the image inside the breast mask;
    - bbox_pixels: pixels in the breast's bounding box (what the denoiser is given);
    - estimate_variance: the estimate's noise variance relative to the input's, mean in the
      breast (spectral and noise-aware blends);
    - low_dose_weight: mean ω₁ in the breast (spectral: the input's noise-weighted mean weight, ×1/r);
    - predicted_noise_ratio: the output's noise / full-dose noise the spectral blend predicts from
      its statistics (1 when reached; above 1 when no blend reaches it);
    - noise_correlation, noise_correlation_expected: the lag-1 correlation of the GAT-domain noise
      in the image's direct-exposure background (mean of vertical and horizontal) and the one the
      configured kernel κ implies (0 for white noise); noise_correlation_difference is the larger
      |measured − expected| of the two directions (≈0 when the detector's correlation still fits;
      NaN without enough background, see `check_noise_correlation`);
    - mean_ratio: restored mean / ((z − τ)/r) mean in the breast, offsets removed (≈1: unbiased).

    Timings (seconds): mask, gat, denoise, inverse, noise_statistics, blend, qc, total (the stages
    that ran).
    """

    name = "gat-bm3d"

    def __init__(
        self,
        denoiser: str | Denoiser = "bm3d",
        denoiser_options: Mapping[str, object] | None = None,
        margin: int = _MIN_MARGIN,
        blend: str = "spectral",
    ) -> None:
        if margin < _MIN_MARGIN:
            raise ConfigurationError(f"margin must be at least {_MIN_MARGIN} px so BM3D has context around the breast")
        if blend not in BLEND_MODES:
            raise ConfigurationError(f"unknown blend {blend!r}; available: {', '.join(BLEND_MODES)}")
        self.denoiser = get_denoiser(denoiser, **(denoiser_options or {})) if isinstance(denoiser, str) else denoiser
        self.margin = margin
        self.blend_mode = blend

    def restore(self, raw: np.ndarray, noise: NoiseModel, dose_fraction: float) -> Restoration:
        raw = validated_input(raw, noise, dose_fraction)
        timer = StageTimer()
        lap = timer.lap
        breast = BreastBox.of(raw, noise, self.margin)
        image = linear_rescale(raw, noise, dose_fraction)
        lap("mask")

        box_noise = breast.crop_noise(noise)
        box_mask = breast.box_mask
        box = breast.crop(raw)
        estimate_variance = low_dose_weight = predicted_noise_ratio = np.nan
        if box.size and dose_fraction < 1:
            gat_image = gat_forward(box, box_noise)
            lap("gat")
            denoiser = self.denoiser.for_image(gat_image, box_noise, dose_fraction)
            gat_estimate = denoiser(gat_image, 1.0, box_noise.kernel)  # None: white noise
            lap("denoise")
            estimate = gat_inverse(gat_estimate, box_noise)
            lap("inverse")
            if self.blend_mode == "spectral":
                probes = probe_responses(denoiser, gat_image, SPECTRAL_PROBES, kernel=box_noise.kernel)
                lap("noise_statistics")
                blended = spectral_blend(box, estimate, box_noise, dose_fraction, probes, box_mask)
                image[breast.rows, breast.cols] = blended.image
                estimate_variance, low_dose_weight = blended.estimate_variance, blended.low_dose_weight
                predicted_noise_ratio = blended.predicted_noise_ratio
            else:
                pixel_statistics: tuple[np.ndarray | float, np.ndarray | float] = (0.0, 0.0)
                if self.blend_mode == "noise-aware":
                    pixel_statistics = estimate_noise_statistics(denoiser, gat_image, kernel=box_noise.kernel)
                    estimate_variance = float(np.mean(np.asarray(pixel_statistics[0])[box_mask]))
                    lap("noise_statistics")
                w_low, w_estimate = blend_weights(estimate, box_noise, dose_fraction, *pixel_statistics)
                image[breast.rows, breast.cols] = combine(box, estimate, noise.offset, w_low, w_estimate)
                low_dose_weight = float(np.mean(w_low[box_mask]))
            lap("blend")

        qc = {
            **breast.qc(),
            "estimate_variance": estimate_variance,
            "low_dose_weight": low_dose_weight,
            "predicted_noise_ratio": predicted_noise_ratio,
            **_correlation_check(raw, noise, breast.mask),
            "mean_ratio": mean_ratio(image, raw, noise, dose_fraction, breast.mask),
        }
        lap("qc")
        network = self.denoiser if isinstance(self.denoiser, NetworkDenoiser) else None
        provenance = Provenance(
            method=self.name,
            device=network.device if network else "cpu",
            options={
                "blend": self.blend_mode,
                "margin": self.margin,
                "denoiser": self.denoiser.name,
                # whether the denoiser was told the noise's spectrum (the noise model has a kernel κ)
                "noise": "white" if noise.kernel is None else "coloured",
                **({"model": network.model} if network else {}),
            },
            model_name=network.model if network else None,
            model_digest=network.digest if network else None,
        )
        return Restoration(image=image, provenance=provenance, qc=qc, timings=timer.finish())


@register_restorer("gat-bm3d", GatBm3dOptions)
def _create(options: GatBm3dOptions, environment: Environment) -> GatBm3dRestorer:
    """BM3D runs on the CPU whatever the environment's device (a GPU backend is future work); a
    network denoiser runs on the environment's device, from its model directory."""
    denoiser_options: dict[str, object] = {}
    if options.denoiser == "network":
        denoiser_options = {"model": options.model, "model_dir": environment.model_dir, "device": environment.device}
    return GatBm3dRestorer(
        denoiser=options.denoiser, denoiser_options=denoiser_options, margin=options.margin, blend=options.blend
    )


def _correlation_check(raw: np.ndarray, noise: NoiseModel, mask: np.ndarray) -> dict[str, float]:
    correlation = check_noise_correlation(raw, noise, mask)
    return {
        "noise_correlation": float(np.mean(correlation.measured)),
        "noise_correlation_expected": float(np.mean(correlation.expected)),
        "noise_correlation_difference": correlation.difference,
    }
