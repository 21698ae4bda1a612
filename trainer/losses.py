"""The training losses of the seed papers, selectable by name and combinable with weights.

`make_loss("pl4")` or `make_loss({"mse": 1, "pl4": 0.1})` gives one module `loss(prediction,
target)`. Names:

- "mse", "mae"; "charbonnier": mean √(d² + ε²), ε = 1e-3 (seed 002).
- "ssim": 1 − SSIM (Gaussian window 11, σ 1.5, C₁ = (0.01·L)², C₂ = (0.03·L)²) with L = 1: the
  networks work in normalised units where the image spans about [0, 1] (`Normalisation`). Images
  are neither clipped nor rescaled per patch, so the constants stay fixed in those units.
- "pl1".."pl4": MSE between frozen ImageNet VGG16 features at relu1_2, relu2_2, relu3_3, relu4_3
  (the grey image repeated to three channels, no ImageNet normalisation, as in seed 000's code);
  "pl4-nopool": relu4_3 with the three max-pools before it removed (full resolution).
- "mse+10ssim": MSE + 10·(1 − SSIM) (seed 001).
- "protocol": the evaluation protocol's own figures as the loss (Vimieiro et al.'s "CNN on VST"):
  the network's GAT-domain output goes through the unbiased inverse and science.md's plain blend,
  and over the R consecutive realisations of each patch B² + w·|RN − RN_FD| (`ProtocolLoss`).
  Its targets are packed (`trainer.data.PACKED_TARGETS`); every other term reads channel 0.

The perceptual losses read the VGG16 weights from a local file (`trainer.vgg`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dicom_node.errors import ConfigurationError
from dicom_node.restore.gat import SMALLEST_D, unbiased_counts
from trainer.vgg import VGG16Features, load_vgg16_features

# Index in VGG16's `features` of the ReLU each perceptual loss compares: relu1_2 … relu4_3.
PERCEPTUAL_LAYERS = {"pl1": 3, "pl2": 8, "pl3": 15, "pl4": 22, "pl4-nopool": 22}
MAX_POOLS_BEFORE_RELU4_3 = (4, 9, 16)
COMPOSITES = {"mse+10ssim": {"mse": 1.0, "ssim": 10.0}}
LOSS_NAMES = ("mse", "mae", "ssim", *PERCEPTUAL_LAYERS, "charbonnier", "protocol", *COMPOSITES)


def ssim(
    a: torch.Tensor, b: torch.Tensor, *, data_range: float = 1.0, window: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """Mean SSIM (Wang et al. 2004) of two [B, C, H, W] batches, as a scalar tensor.

    Averaged over the windows that lie wholly inside the image, like the reference code and
    scikit-image (seed 000's pytorch_ssim zero-pads instead, which biases the border windows).
    Computed in float32 or better even under autocast: C₁ = 1e-4 underflows half precision.
    """
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"SSIM needs two [B, C, H, W] tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if min(a.shape[-2:]) < window:
        raise ValueError(f"SSIM needs images of at least {window}×{window} pixels, got {tuple(a.shape[-2:])}")
    with torch.autocast(a.device.type, enabled=False):
        dtype = torch.promote_types(a.dtype, torch.float32)
        a = a.to(dtype).reshape(-1, 1, *a.shape[-2:])
        b = b.to(dtype).reshape(-1, 1, *b.shape[-2:])
        offsets = torch.arange(window, dtype=dtype, device=a.device) - (window - 1) / 2
        gauss = torch.exp(-(offsets**2) / (2 * sigma**2))
        gauss = gauss / gauss.sum()
        moments = torch.cat([a, b, a * a, b * b, a * b], dim=1)
        moments = F.conv2d(moments, gauss.view(1, 1, 1, -1).expand(5, 1, 1, window), groups=5)
        moments = F.conv2d(moments, gauss.view(1, 1, -1, 1).expand(5, 1, window, 1), groups=5)
        mean_a, mean_b, aa, bb, ab = moments.unbind(dim=1)
        var_a, var_b, cov = aa - mean_a**2, bb - mean_b**2, ab - mean_a * mean_b
        c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
        similarity = ((2 * mean_a * mean_b + c1) * (2 * cov + c2)) / (
            (mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2)
        )
        return similarity.mean()


class SSIMLoss(nn.Module):
    def __init__(self, data_range: float = 1.0) -> None:
        super().__init__()
        self.data_range = data_range

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 1 - ssim(prediction, target, data_range=self.data_range)


class CharbonnierLoss(nn.Module):
    """A smooth L1: quadratic within ε of zero, so its gradient is defined everywhere."""

    def __init__(self, epsilon: float = 1e-3) -> None:
        super().__init__()
        self.epsilon = epsilon

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.sqrt((prediction - target) ** 2 + self.epsilon**2).mean()


class PerceptualLoss(nn.Module):
    """MSE between VGG16 features of prediction and target at one layer (`PERCEPTUAL_LAYERS`)."""

    def __init__(self, vgg: VGG16Features, name: str) -> None:
        super().__init__()
        skipped = MAX_POOLS_BEFORE_RELU4_3 if name.endswith("-nopool") else ()
        layers = list(vgg.features.children())[: PERCEPTUAL_LAYERS[name] + 1]
        self.layers = nn.Sequential(*(layer for index, layer in enumerate(layers) if index not in skipped))

    def features(self, image: torch.Tensor) -> torch.Tensor:
        return self.layers(image.expand(-1, 3, -1, -1))

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.features(prediction), self.features(target))


class ProtocolLoss(nn.Module):
    """(B² + w·|RN − RN_FD|)/RN_FD of the restored patches, mean over patches (science.md's protocol,
    exact against the truth): the restoration is the plain blend of the low-dose input with the
    unbiased inverse of the network's output, so the network learns the estimate that blend needs
    to land at full-dose noise with the least bias.

    Per patch, over its R realisations X_p and truth s (full dose, offset-free):
    RN = mean_I(var_p(X)/s), B² = mean_I((mean_p X − s)²/s) − RN/R, RN_FD = mean_I((λs + σ_e²)/s).
    Relative to RN_FD, as the goals are (RN/FD, MNSE/FD): every dose and detector weighs alike,
    where the absolute figures would let the noisiest (quarter dose, high λ) patches dominate.
    """

    def __init__(self, realisations: int, rn_weight: float, scale: float) -> None:
        super().__init__()
        if realisations < 2:
            raise ConfigurationError("the protocol loss needs 2 or more realisations per patch")
        self.realisations, self.rn_weight, self.scale = realisations, rn_weight, scale

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _, truth, low_dose, gain, electronic_variance, dose = target.float().unbind(dim=1)
        d = torch.clamp(prediction[:, 0].float() * self.scale, min=SMALLEST_D)
        estimate = gain * torch.clamp(unbiased_counts(d, electronic_variance / gain**2), min=0.0)
        signal = estimate / dose  # the plain blend (blend.blend_weights with a noise-free estimate)
        w_low = torch.sqrt((gain * signal + electronic_variance) / (gain * dose * signal + electronic_variance))
        restored = w_low * low_dose + (1 / dose - w_low) * estimate
        groups = (-1, self.realisations, *restored.shape[-2:])
        restored = restored.reshape(groups)
        first = (slice(None), 0)
        truth = torch.clamp(truth.reshape(groups)[first], min=1.0)
        full_dose_variance = gain.reshape(groups)[first] * truth + electronic_variance.reshape(groups)[first]
        noise = (restored.var(dim=1) / truth).mean(dim=(1, 2))
        bias2 = ((restored.mean(dim=1) - truth) ** 2 / truth).mean(dim=(1, 2)) - noise / self.realisations
        full_dose_noise = (full_dose_variance / truth).mean(dim=(1, 2))
        return ((bias2 + self.rn_weight * torch.abs(noise - full_dose_noise)) / full_dose_noise).mean()


class WeightedLoss(nn.Module):
    """Σ weight · term(prediction, target); `weights` keeps the flattened spec for the model card."""

    def __init__(self, terms: dict[str, nn.Module], weights: dict[str, float]) -> None:
        super().__init__()
        self.terms = nn.ModuleDict(terms)
        self.weights = weights

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        image = target[:, :1]  # packed targets (the protocol loss's) carry the image target first
        return sum(
            weight * self.terms[name](prediction, target if name == "protocol" else image)
            for name, weight in self.weights.items()
        )


def loss_weights(spec: str | Mapping[str, float]) -> dict[str, float]:
    """The spec as base terms and weights, composites expanded: "mse+10ssim" → {mse: 1, ssim: 10}.

    An empty spec, an unknown name or a weight that is not a positive number is a `ConfigurationError`.
    """
    spec = {spec: 1.0} if isinstance(spec, str) else dict(spec)
    if not spec:
        raise ConfigurationError("a loss needs at least one term")
    weights: dict[str, float] = {}
    for name, weight in spec.items():
        if name not in LOSS_NAMES:
            raise ConfigurationError(f"unknown loss {name!r}; known: {', '.join(LOSS_NAMES)}")
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise ConfigurationError(f"loss weight for {name!r} must be a positive number, got {weight!r}") from None
        if not (math.isfinite(weight) and weight > 0):
            raise ConfigurationError(f"loss weight for {name!r} must be a positive number, got {weight}")
        for term, factor in COMPOSITES.get(name, {name: 1.0}).items():
            weights[term] = weights.get(term, 0.0) + weight * factor
    return weights


def make_loss(
    spec: str | Mapping[str, float],
    *,
    vgg_weights: Path | str | None = None,
    device: torch.device | str | None = None,
    realisations: int = 1,
    rn_weight: float = 1.0,
    scale: float = 1.0,
) -> WeightedLoss:
    """The loss module for `spec` (a name or {name: weight}); perceptual terms need `vgg_weights`,
    the protocol term the realisations per patch, its RN weight and the normalisation's scale."""
    weights = loss_weights(spec)
    simple: dict[str, type[nn.Module]] = {
        "mse": nn.MSELoss,
        "mae": nn.L1Loss,
        "ssim": SSIMLoss,
        "charbonnier": CharbonnierLoss,
    }
    vgg: VGG16Features | None = None  # loaded once, and only for a perceptual term
    terms: dict[str, nn.Module] = {}
    for name in weights:
        if name in PERCEPTUAL_LAYERS:
            if vgg is None:
                vgg = load_vgg16_features(vgg_weights)
            terms[name] = PerceptualLoss(vgg, name)
        elif name == "protocol":
            terms[name] = ProtocolLoss(realisations, rn_weight, scale)
        else:
            terms[name] = simple[name]()
    loss = WeightedLoss(terms, weights)
    return loss if device is None else loss.to(device)
