"""Steps every restorer shares: input validation, the breast box, the linear rescale outside it.

A restorer works on the breast's bounding box (the breast plus a margin of background, where
its own edge effects land); everywhere else the image is only brought to the target dose by the
linear rescale (z − τ)/r + τ, which is exact for the mean and leaves direct exposure as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dicom_node.errors import InputRefused
from dicom_node.restore.mask import bounding_box, breast_mask
from dicom_node.restore.noise import NoiseModel

MIN_SIDE = 64  # px: BM3D's blocks and search window need room (an 8×8 image killed its native code)


def check_shape(shape: tuple[int, ...]) -> None:
    """Refuse (InputRefused) what no restorer can take: not a 2-D image, or smaller than MIN_SIDE a side."""
    if len(shape) != 2 or 0 in shape:
        raise InputRefused(f"the raw image must be a non-empty 2-D array, got shape {shape}")
    if min(shape) < MIN_SIDE:
        raise InputRefused(
            f"the image is {shape[0]}×{shape[1]} px; restoration needs at least {MIN_SIDE}×{MIN_SIDE} "
            "(no mammogram is smaller, and BM3D's native code crashes on tiny images)"
        )


def validated_input(raw: np.ndarray, noise: NoiseModel, dose_fraction: float) -> np.ndarray:
    """`raw` as float64 after checking what every restorer needs; InputRefused says what is wrong."""
    if not (isinstance(dose_fraction, (int, float, np.floating)) and 0 < dose_fraction <= 1):
        raise InputRefused(
            f"dose_fraction must be in (0, 1] (the low-dose acquisition's share of the target dose), "
            f"got {dose_fraction!r}"
        )
    raw = np.asarray(raw, dtype=np.float64)
    check_shape(raw.shape)
    if not np.all(np.isfinite(raw)):
        raise InputRefused("the raw image contains NaN or infinite values")
    if np.ndim(noise.gain) and np.shape(noise.gain) != raw.shape:
        raise InputRefused(f"the gain map has shape {np.shape(noise.gain)} but the image has shape {raw.shape}")
    return raw


def linear_rescale(raw: np.ndarray, noise: NoiseModel, dose_fraction: float) -> np.ndarray:
    """(z − τ)/r + τ: the low-dose image on the target dose's scale, offset kept."""
    return (raw - noise.offset) / dose_fraction + noise.offset


@dataclass(frozen=True)
class BreastBox:
    """The breast mask of an image and the bounding box (with margin) a restorer works on."""

    mask: np.ndarray  # bool, the whole image
    rows: slice
    cols: slice

    @classmethod
    def of(cls, raw: np.ndarray, noise: NoiseModel, margin: int) -> BreastBox:
        mask = breast_mask(raw, noise)
        rows, cols = bounding_box(mask, margin)
        return cls(mask, rows, cols)

    @property
    def box_mask(self) -> np.ndarray:
        return self.mask[self.rows, self.cols]

    def crop(self, image: np.ndarray) -> np.ndarray:
        return image[self.rows, self.cols]

    def crop_noise(self, noise: NoiseModel) -> NoiseModel:
        return noise.crop(self.rows, self.cols)

    def qc(self) -> dict[str, float]:
        """breast_fraction (of the image in the mask) and bbox_pixels (what the restorer is given)."""
        box = self.crop(self.mask)
        return {"breast_fraction": float(self.mask.mean()), "bbox_pixels": float(box.size)}


def mean_ratio(image: np.ndarray, raw: np.ndarray, noise: NoiseModel, dose_fraction: float, mask: np.ndarray) -> float:
    """Restored mean / rescaled input mean in the breast, offsets removed (≈ 1: no bias); NaN without a breast."""
    if not mask.any():
        return float("nan")
    linear = np.mean(raw[mask] - noise.offset) / dose_fraction
    return float(np.mean(image[mask] - noise.offset) / linear) if linear else float("nan")
