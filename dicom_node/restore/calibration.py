"""Estimating the detector noise model (τ, λ, σ_e) from flat fields, and checking it on one image.

Flat fields at several exposures give τ (the intercept of mean vs exposure) and, from the
variance of the detrended noise vs the offset-corrected mean, var = λ·μ + σ_e². Detrending
matters: the heel effect and other gradients are signal, not noise, and would inflate the
variance. Repeats at one exposure help more: their difference cancels the fixed pattern
(pixel-gain non-uniformity), whose variance grows as μ² and would bias λ.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from dicom_node.errors import InputRefused
from dicom_node.restore.noise import NoiseModel

_DETREND_SIGMA = 4.0  # px; removes gradients (heel effect) while keeping almost all white noise
_LOCAL_WINDOW = 65  # px; window of the local statistics behind the gain map


@dataclass
class Calibration:
    offset: float  # τ, ADU
    gain: float  # λ, ADU per unit of offset-free signal
    electronic_noise: float  # σ_e, ADU (std)
    gain_map: np.ndarray | None  # per-pixel λ (smooth quadratic surface), or None
    exposures: np.ndarray  # the distinct exposures, ascending
    means: np.ndarray  # offset-corrected ROI mean per exposure
    variances: np.ndarray  # detrended ROI noise variance per exposure
    offset_fit_r2: float  # r² of ROI mean vs exposure (≈1 for a linear detector)
    variance_fit_r2: float  # r² of variance vs mean
    electronic_noise_clamped: bool  # the fitted σ_e² was negative and was set to 0

    def noise_model(self, use_gain_map: bool = True) -> NoiseModel:
        gain = self.gain_map if use_gain_map and self.gain_map is not None else self.gain
        return NoiseModel(gain=gain, electronic_noise=self.electronic_noise, offset=self.offset)


def calibrate_flat_fields(
    images: Sequence[np.ndarray],
    exposures: Sequence[float],
    roi_fraction: float = 0.5,
    fit_gain_map: bool = True,
) -> Calibration:
    """Noise model from raw flat fields; `exposures` in any unit proportional to dose (e.g. mAs).

    `roi_fraction` is the side of the central ROI as a fraction of the image side.
    """
    stack = _validated_stack(images, exposures)
    exposure = np.asarray(exposures, dtype=np.float64)
    distinct, group_of = np.unique(exposure, return_inverse=True)
    if distinct.size < 2:
        raise InputRefused("calibration needs flat fields at 2 or more distinct exposures")
    roi = _central_roi(stack.shape[1:], roi_fraction)

    roi_means = stack[:, roi[0], roi[1]].mean(axis=(1, 2))
    slope, offset = np.polyfit(exposure, roi_means, 1)
    offset_fit_r2 = _r_squared(roi_means, slope * exposure + offset)

    groups = [stack[group_of == g] for g in range(distinct.size)]
    means = np.array([g[:, roi[0], roi[1]].mean() - offset for g in groups])
    noise_fields = [_noise_fields(g) for g in groups]
    variances = np.array([np.mean([f[roi].var() for f in fields]) for fields in noise_fields])

    if np.any(variances <= 0):
        raise InputRefused("a flat field has no noise at all; are these raw images from the detector?")
    gain, electronic_variance = np.polyfit(means, variances, 1, w=1.0 / variances)
    variance_fit_r2 = _r_squared(variances, gain * means + electronic_variance)
    if gain <= 0:
        raise InputRefused(
            f"noise variance does not grow with signal (fitted gain {gain:.3g}); "
            "are these raw (linear) flat fields at different exposures?"
        )
    clamped = electronic_variance < 0
    electronic_variance = max(float(electronic_variance), 0.0)

    gain_map = None
    if fit_gain_map:
        mean_images = [g.mean(axis=0) - offset for g in groups]
        gain_map = _gain_map(mean_images, noise_fields, means, variances, electronic_variance)

    return Calibration(
        offset=float(offset),
        gain=float(gain),
        electronic_noise=float(np.sqrt(electronic_variance)),
        gain_map=gain_map,
        exposures=distinct,
        means=means,
        variances=variances,
        offset_fit_r2=offset_fit_r2,
        variance_fit_r2=variance_fit_r2,
        electronic_noise_clamped=bool(clamped),
    )


def estimate_noise_from_image(
    z: np.ndarray,
    offset: float,
    mask: np.ndarray | None = None,
    electronic_variance: float | None = None,
    bins: int = 16,
) -> tuple[float, float]:
    """(λ, σ_e²) from one raw image, as a QC check of the calibration.

    A second-difference high-pass (Immerkær's kernel, unit gain for white noise) cancels smooth
    structure; pixels are binned by local mean and each bin's noise variance is taken from the
    median absolute deviation, so edges and calcifications in a bin do not inflate it; then a
    weighted line var = λ·μ + σ_e². Assumes white noise (a-Se detectors).

    Over a narrow range of signal (a breast of even thickness) slope and intercept trade off;
    pass the calibrated `electronic_variance` to fit λ alone, which is then well determined.
    A fitted σ_e² is clamped at 0.
    """
    signal = np.asarray(z, dtype=np.float64) - offset
    if signal.ndim != 2:
        raise InputRefused(f"estimate_noise_from_image needs a 2-D image, got shape {signal.shape}")
    kernel = np.outer([1.0, -2.0, 1.0], [1.0, -2.0, 1.0]) / 6.0
    high_pass = ndimage.convolve(signal, kernel, mode="reflect")
    local_mean = ndimage.uniform_filter(signal, 7, mode="reflect")
    usable = np.ones(signal.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    usable = ndimage.binary_erosion(usable, iterations=3, border_value=0) & (local_mean > 0)
    if usable.sum() < 100 * bins:
        raise InputRefused("too few usable pixels to estimate the noise from this image")

    bin_means: list[float] = []
    bin_variances: list[float] = []
    bin_counts: list[int] = []
    edges = np.quantile(local_mean[usable], np.linspace(0, 1, bins + 1))
    which = np.digitize(local_mean[usable], edges[1:-1])
    values, levels = high_pass[usable], local_mean[usable]
    for b in range(bins):
        in_bin = values[which == b]
        if in_bin.size < 50:
            continue
        mad = np.median(np.abs(in_bin - np.median(in_bin)))
        bin_means.append(levels[which == b].mean())
        bin_variances.append((1.4826 * mad) ** 2)
        bin_counts.append(in_bin.size)
    means, variances, counts = np.asarray(bin_means), np.asarray(bin_variances), np.asarray(bin_counts)
    weights = counts / variances**2  # a variance estimate's own variance grows as its square
    if electronic_variance is not None:
        gain = np.sum(weights * means * (variances - electronic_variance)) / np.sum(weights * means**2)
        return float(gain), float(electronic_variance)
    gain, intercept = np.polyfit(means, variances, 1, w=np.sqrt(weights))
    return float(gain), max(float(intercept), 0.0)


def _validated_stack(images: Sequence[np.ndarray], exposures: Sequence[float]) -> np.ndarray:
    if len(images) != len(exposures):
        raise InputRefused(f"got {len(images)} images but {len(exposures)} exposures")
    if len(images) == 0:
        raise InputRefused("calibration needs flat-field images")
    shapes = {np.shape(image) for image in images}
    if len(shapes) != 1:
        raise InputRefused(f"flat fields must all have the same shape, got {sorted(shapes)}")
    stack = np.asarray(images, dtype=np.float64)
    if stack.ndim != 3:
        raise InputRefused(f"flat fields must be 2-D images, got shape {stack.shape[1:]}")
    if not np.all(np.isfinite(stack)) or not np.all(np.isfinite(exposures)):
        raise InputRefused("flat fields and exposures must be finite numbers")
    return stack


def _central_roi(shape: tuple[int, ...], fraction: float) -> tuple[slice, slice]:
    if not 0 < fraction <= 1:
        raise InputRefused(f"roi_fraction must be in (0, 1], got {fraction}")

    def centred(n: int) -> slice:
        return slice(int(n * (1 - fraction) / 2), int(n * (1 + fraction) / 2))

    return centred(shape[0]), centred(shape[1])


def _noise_fields(group: np.ndarray) -> list[np.ndarray]:
    """Zero-mean fields with the variance of one image's noise, gradients removed.

    Pairs of repeats give (a − b)/√2, which also cancels the fixed pattern; a lone image is
    used as it is. The high-pass's loss of white-noise variance is corrected exactly.
    """
    if len(group) >= 2:
        # An odd repeat left over is unused.
        fields = [(a - b) / np.sqrt(2) for a, b in zip(group[0::2], group[1::2], strict=False)]
    else:
        fields = [group[0]]
    return [_high_pass(f) / np.sqrt(_high_pass_gain()) for f in fields]


def _high_pass(image: np.ndarray) -> np.ndarray:
    return image - ndimage.gaussian_filter(image, _DETREND_SIGMA, mode="reflect")


def _high_pass_gain() -> float:
    """Fraction of white-noise variance that `_high_pass` keeps (Σ of its squared kernel)."""
    size = int(8 * _DETREND_SIGMA) + 1
    impulse = np.zeros((size, size))
    impulse[size // 2, size // 2] = 1.0
    return float(np.sum(_high_pass(impulse) ** 2))


def _gain_map(
    mean_images: list[np.ndarray],
    noise_fields: list[list[np.ndarray]],
    means: np.ndarray,
    variances: np.ndarray,
    electronic_variance: float,
) -> np.ndarray:
    """Per-pixel λ from local mean and variance, averaged over exposures, smoothed by a quadratic.

    Exposures are weighted by (μ/var)², the inverse relative variance of their λ estimates.
    """
    shape = mean_images[0].shape
    window = min(_LOCAL_WINDOW, *shape)
    weights = (means / variances) ** 2
    local_gain = np.zeros(shape)
    for weight, mean_image, fields in zip(weights, mean_images, noise_fields, strict=True):
        local_mean = ndimage.uniform_filter(mean_image, window, mode="reflect")
        local_variance = np.mean([ndimage.uniform_filter(f**2, window, mode="reflect") for f in fields], axis=0)
        local_gain += weight * (local_variance - electronic_variance) / np.maximum(local_mean, 1e-12)
    local_gain /= weights.sum()

    rows, cols = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    design = np.stack([np.ones_like(rows), rows, cols, rows**2, rows * cols, cols**2], axis=-1)
    sample = (slice(None, None, 4), slice(None, None, 4))  # every 16th pixel is plenty for 6 coefficients
    coefficients, *_ = np.linalg.lstsq(design[sample].reshape(-1, 6), local_gain[sample].ravel(), rcond=None)
    return design @ coefficients


def _r_squared(observed: np.ndarray, fitted: np.ndarray) -> float:
    total = np.sum((observed - observed.mean()) ** 2)
    return float(1.0 - np.sum((observed - fitted) ** 2) / total) if total > 0 else 1.0
