"""The breast region of a raw (linear, "FOR PROCESSING") mammogram.

In raw data the unattenuated background (direct exposure) is the brightest part of the image,
often saturated, and the breast is darker. The mask separates the two with Otsu's threshold on a
smoothed log image, keeps the largest dark component, fills its holes and erodes it slightly so
its edge lies inside the skin line.

Behaviour at the extremes:
- no background (the breast or a phantom fills the detector): the two Otsu classes differ by
  less than `min_contrast` in signal, so the whole image is breast;
- no breast (a constant image, e.g. fully saturated): all False.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from dicom_node.restore.noise import NoiseModel


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the split of `values` that maximises the between-class variance."""
    counts, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(counts * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_low = sum_low / weight_low
        mean_high = (sum_low[-1] - sum_low) / weight_high
        between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(edges[1:][np.nanargmax(np.where(weight_high > 0, between, np.nan))])


def breast_mask(
    z: np.ndarray,
    noise: NoiseModel,
    min_contrast: float = 2.0,
    erosion_px: int = 3,
) -> np.ndarray:
    """Boolean breast mask of raw image `z`.

    `min_contrast` is the least ratio of background to breast mean signal (offset removed) for
    the brighter class to count as direct exposure; direct exposure is several times brighter
    than the breast, whereas density variations inside a breast are not.
    """
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"breast_mask needs a 2-D image, got shape {z.shape}")
    signal = np.maximum(z - noise.offset, 1.0)
    if np.ptp(signal) == 0:
        return np.zeros(z.shape, dtype=bool)
    smoothing = max(1.0, min(z.shape) / 256)
    log_signal = ndimage.gaussian_filter(np.log(signal), smoothing)
    threshold = otsu_threshold(log_signal)
    dark = log_signal <= threshold
    if not dark.any() or dark.all():
        return np.ones(z.shape, dtype=bool)
    contrast = np.exp(log_signal[~dark].mean() - log_signal[dark].mean())
    if contrast < min_contrast:
        return np.ones(z.shape, dtype=bool)

    labels, count = ndimage.label(dark)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    breast = ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))
    if erosion_px > 0:
        # border_value=1: the chest-wall edge of the image is not a skin line; do not erode it.
        breast = ndimage.binary_erosion(breast, iterations=erosion_px, border_value=1)
    return breast


def bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, slice]:
    """Rows and columns spanning `mask` plus `margin` pixels, clipped to the image.

    An empty mask gives empty slices.
    """
    if margin < 0:
        raise ValueError(f"margin must be ≥ 0, got {margin}")
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return slice(0, 0), slice(0, 0)
    height, width = mask.shape
    return (
        slice(max(0, rows[0] - margin), min(height, rows[-1] + 1 + margin)),
        slice(max(0, cols[0] - margin), min(width, cols[-1] + 1 + margin)),
    )
