"""Estimating the detector noise model (τ, λ, σ_e, κ) from flat fields, and checking it on one image.

Flat fields at several exposures give τ (the intercept of mean vs exposure) and, from the
variance of the detrended noise vs the offset-corrected mean, var = λ·μ + σ_e². Detrending
matters: the heel effect and other gradients are signal, not noise, and would inflate the
variance. Repeats at one exposure help more: their difference cancels the fixed pattern
(pixel-gain non-uniformity), whose variance grows as μ² and would bias λ.

Repeats also give the noise's spatial correlation (its power spectrum): see `_noise_spectrum`.
Correlated noise has more power at low frequencies, which the detrending removes, so the
detrended variance of correlated noise is too low (8 % for 3×3 crosstalk of strength 0.5); the
measured spectrum corrects it before λ is fitted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import fft, ndimage

from dicom_node.errors import InputRefused
from dicom_node.restore.gat import gat_forward
from dicom_node.restore.mask import breast_mask
from dicom_node.restore.noise import NoiseModel

_DETREND_SIGMA = 4.0  # px; removes gradients (heel effect) while keeping almost all white noise
_LOCAL_WINDOW = 65  # px; window of the local statistics behind the gain map

# The noise spectrum (see `_noise_spectrum`).
_SPECTRUM_REGION = 0.8  # side of the central region the spectrum is measured in, as a fraction of the image's
_MIN_SIDE = 32  # px; a smaller region gives no spectrum
_MAX_KERNEL = 15  # px; the largest kernel stored (its autocorrelation spans lags of ±14)
_KERNEL_ENERGY = 0.99  # the stored kernel is the smallest odd crop holding this much of its energy
_KERNEL_EXPOSURES = 0.4  # κ comes from the exposures whose mean is at least this fraction of the highest
_WHITE_Z = 4.0  # noise is white while both neighbour correlations are within this many standard errors of 0
_SIGNIFICANT_Z = 4.0  # the kernel's size: the farthest lag whose correlation exceeds this many standard errors
_MAX_LAG = _MAX_KERNEL - 1  # the autocorrelation of the largest kernel reaches this far


@dataclass
class Calibration:
    offset: float  # τ, ADU
    gain: float  # λ, ADU per unit of offset-free signal
    electronic_noise: float  # σ_e, ADU (std)
    gain_map: np.ndarray | None  # per-pixel λ (smooth quadratic surface), or None
    exposures: np.ndarray  # the distinct exposures, ascending
    means: np.ndarray  # offset-corrected ROI mean per exposure
    variances: np.ndarray  # detrended ROI noise variance per exposure (corrected for the noise's correlation)
    offset_fit_r2: float  # r² of ROI mean vs exposure (≈1 for a linear detector)
    variance_fit_r2: float  # r² of variance vs mean
    electronic_noise_clamped: bool  # the fitted σ_e² was negative and was set to 0
    # The GAT-domain noise correlation, measured on pairs of repeats (NaN and None without any).
    # Coefficients are (vertical, horizontal): lag 1 along the rows' axis, along the columns' axis.
    noise_kernel: np.ndarray | None = None  # κ (odd-sized, ‖κ‖₂ = 1); None: white within the measurement error
    neighbour_correlation: float = float("nan")  # mean of the two lag-1 correlation coefficients
    neighbour_correlations: tuple[float, float] = (float("nan"), float("nan"))
    neighbour_correlation_error: float = float("nan")  # standard error of each coefficient if the noise were white
    kernel_exposures: np.ndarray | None = None  # the exposures κ and the coefficients come from
    variance_corrections: np.ndarray | None = None  # per exposure: factor the detrended variance was corrected by

    def noise_model(self, use_gain_map: bool = True) -> NoiseModel:
        gain = self.gain_map if use_gain_map and self.gain_map is not None else self.gain
        return NoiseModel(
            gain=gain, electronic_noise=self.electronic_noise, offset=self.offset, kernel=self.noise_kernel
        )


def calibrate_flat_fields(
    images: Sequence[np.ndarray],
    exposures: Sequence[float],
    roi_fraction: float = 0.5,
    fit_gain_map: bool = True,
) -> Calibration:
    """Noise model from raw flat fields; `exposures` in any unit proportional to dose (e.g. mAs).

    `roi_fraction` is the side of the central ROI as a fraction of the image side. Exposures with
    two or more repeats also give the noise correlation (κ, see `_noise_spectrum`), which corrects
    the detrended variances before λ and σ_e are fitted; without repeats the noise is taken as white.
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
    gain, electronic_variance = _fit_variance_line(means, variances)

    # The spectrum is measured in the GAT domain of this first (white-noise) fit: a few per cent
    # error in λ scales the GAT-domain noise but does not change its correlation.
    first_fit = NoiseModel(float(gain), float(np.sqrt(max(electronic_variance, 0.0))), float(offset))
    lag_sums = [_pair_lag_sums(g, first_fit) for g in groups]
    corrections = _variance_corrections(lag_sums, means)
    if corrections is not None:
        variances = variances * corrections
        noise_fields = [[f * np.sqrt(c) for f in fields] for c, fields in zip(corrections, noise_fields, strict=True)]
        gain, electronic_variance = _fit_variance_line(means, variances)
    variance_fit_r2 = _r_squared(variances, gain * means + electronic_variance)
    clamped = electronic_variance < 0
    electronic_variance = max(float(electronic_variance), 0.0)

    gain_map = None
    if fit_gain_map:
        mean_images = [g.mean(axis=0) - offset for g in groups]
        gain_map = _gain_map(mean_images, noise_fields, means, variances, electronic_variance)

    spectrum = _noise_spectrum(lag_sums, means, distinct)
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
        noise_kernel=spectrum.kernel,
        neighbour_correlation=float(np.mean(spectrum.neighbour_correlations)),
        neighbour_correlations=spectrum.neighbour_correlations,
        neighbour_correlation_error=spectrum.standard_error,
        kernel_exposures=spectrum.exposures,
        variance_corrections=corrections,
    )


def _fit_variance_line(means: np.ndarray, variances: np.ndarray) -> tuple[float, float]:
    """(λ, σ_e²) of var = λ·μ + σ_e², weighted by 1/var; refuses a line that does not rise."""
    gain, electronic_variance = np.polyfit(means, variances, 1, w=1.0 / variances)
    if gain <= 0:
        raise InputRefused(
            f"noise variance does not grow with signal (fitted gain {gain:.3g}); "
            "are these raw (linear) flat fields at different exposures?"
        )
    return float(gain), float(electronic_variance)


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


@dataclass(frozen=True)
class NoiseCorrelationCheck:
    """Neighbour correlation of one image's GAT-domain noise in its direct-exposure background, vs the model's κ.

    Coefficients are (vertical, horizontal): lag 1 along the rows' axis (pixel and the one below)
    and along the columns' axis (pixel and the one to its right).
    """

    measured: tuple[float, float]  # in the image's background; NaN when there is too little background
    expected: tuple[float, float]  # of the configured kernel κ; (0, 0) when the model's noise is white
    standard_error: float  # of each measured coefficient if the model is right; NaN when not measured
    pixels: int  # background pixels used
    background_signal: float  # their mean offset-free signal (ADU); NaN when none

    @property
    def difference(self) -> float:
        """Largest |measured − expected| of the two coefficients; NaN when not measured."""
        return float(max(abs(m - e) for m, e in zip(self.measured, self.expected, strict=True)))

    def agrees(self, tolerance: float = 0.05) -> bool:
        """The image's noise correlation matches the model within `tolerance` plus 4 standard errors.

        The tolerance allows for the background's quantum fraction λy/(λy + σ_e²) differing from
        the calibration's (the GAT-domain correlation scales with it). False when not measured.
        """
        return bool(self.difference <= tolerance + 4 * self.standard_error)


def check_noise_correlation(
    z: np.ndarray,
    noise: NoiseModel,
    mask: np.ndarray | None = None,
    min_pairs: int = 4096,
) -> NoiseCorrelationCheck:
    """QC of the noise model's κ on one raw image: the noise correlation of its unattenuated background.

    The background is the image outside the breast mask (`breast_mask` unless `mask` is given),
    at least 2 % of the image's smaller side (16 px at least) from the breast and 1 % (8 px at
    least) from the image's edges, without the pixels near saturation (a clipped background has
    no noise). The image is GAT-transformed with `noise`; in 64×64 tiles with at least a quarter
    of their pixels in the background a least-squares plane is removed (the heel effect and any
    scatter gradient: a high-pass that leaves lag-1 correlations nearly untouched, −3/n for n
    pixels), and the lag-1 correlation coefficients are taken over pixel pairs inside one tile.
    With fewer than `min_pairs` pairs the measured figures are NaN.
    """
    image = np.asarray(z, dtype=np.float64)
    if image.ndim != 2:
        raise InputRefused(f"check_noise_correlation needs a 2-D image, got shape {image.shape}")
    expected = kernel_neighbour_correlations(noise.kernel)
    breast = breast_mask(image, noise) if mask is None else np.asarray(mask, dtype=bool)
    if breast.shape != image.shape:
        raise InputRefused(f"the mask is {breast.shape} but the image is {image.shape}")

    residual, valid, tiles = _background_residuals(image, noise, breast)
    sums = []
    for axis in (0, 1):
        first = [slice(None), slice(None)]
        second = [slice(None), slice(None)]
        first[axis], second[axis] = slice(None, -1), slice(1, None)
        a, b = (residual[tuple(first)], residual[tuple(second)])
        pairs = valid[tuple(first)] & valid[tuple(second)] & (tiles[tuple(first)] == tiles[tuple(second)])
        a, b = a[pairs], b[pairs]
        sums.append((float(np.sum(a * b)), float(np.sqrt(np.sum(a**2) * np.sum(b**2))), int(a.size)))
    pixels = int(np.count_nonzero(valid))
    signal = float(image[valid].mean() - noise.offset) if pixels else float("nan")
    count = min(n for _, _, n in sums)
    if count < min_pairs:
        return NoiseCorrelationCheck((float("nan"), float("nan")), expected, float("nan"), pixels, signal)
    measured = (sums[0][0] / sums[0][1], sums[1][0] / sums[1][1])
    # Bartlett: a lag-1 coefficient's variance is Σ_k ρ(k)²/n for noise of correlation ρ (1/n when white).
    spread = 1.0 if noise.kernel is None else float(np.sqrt(np.sum(_autocorrelation(noise.kernel) ** 2)))
    return NoiseCorrelationCheck(measured, expected, float(spread / np.sqrt(count)), pixels, signal)


def background_noise_std(z: np.ndarray, noise: NoiseModel, mask: np.ndarray, min_tiles: int = 4) -> float:
    """Std of the GAT-domain noise in the direct-exposure background (the region `check_noise_correlation`
    uses): 1 when λ, σ_e and τ are right, whatever the noise's correlation, since the GAT makes the
    noise's variance 1 and κ keeps it. No anatomy there, so no texture to remove. The variance is
    the median over tiles of each tile's variance around its plane (corrected for the plane's 3
    degrees of freedom): a tile that catches the breast's thin edge, whose signal curves too
    sharply for a plane, does not move a median. NaN with fewer than `min_tiles` background tiles."""
    residual, valid, tiles = _background_residuals(np.asarray(z, dtype=np.float64), noise, mask)
    index = tiles[valid]
    counts = np.bincount(index)
    sums = np.bincount(index, weights=residual[valid] ** 2)
    used = counts > 3
    if np.count_nonzero(used) < min_tiles:
        return float("nan")
    return float(np.sqrt(np.median(sums[used] / (counts[used] - 3))))


def _background_residuals(
    image: np.ndarray, noise: NoiseModel, breast: np.ndarray, tile: int = 64
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The GAT-domain background minus a plane per tile (`_plane_residuals`): at least 2 % of the
    image's smaller side (16 px at least) from the breast, 1 % (8 px at least) from the image's
    edges, without the pixels near saturation (a clipped background has no noise)."""
    usable = ~breast
    if breast.any():
        usable &= ndimage.distance_transform_edt(~breast) >= max(16, min(image.shape) // 50)
    border = max(8, min(image.shape) // 100)
    usable[:border] = usable[-border:] = False
    usable[:, :border] = usable[:, -border:] = False
    usable &= ~_near_saturation(image, noise)
    return _plane_residuals(gat_forward(image, noise), usable, tile)


def _near_saturation(image: np.ndarray, noise: NoiseModel) -> np.ndarray:
    """Pixels whose noise may be clipped: their local mean is within 5 noise std of a clipped maximum."""
    top = float(image.max())
    if np.count_nonzero(image == top) <= 10:  # noisy unclipped pixels rarely share the maximum
        return np.zeros(image.shape, dtype=bool)
    local = ndimage.uniform_filter(image, 9, mode="reflect")
    near = local + 5 * np.sqrt(noise.variance(local - noise.offset)) >= top
    return np.asarray(ndimage.binary_dilation(near, iterations=4))


def _plane_residuals(values: np.ndarray, usable: np.ndarray, tile: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(residual, valid, tile index): `values` minus a least-squares plane per tile, over its usable pixels.

    A tile is used when at least a quarter of its pixels are usable; `valid` marks the pixels used.
    """
    rows, cols = np.indices(values.shape)
    per_row = -(-values.shape[1] // tile)
    tiles = (rows // tile) * per_row + cols // tile
    count = int(tiles.max()) + 1
    y, x = (rows % tile - tile / 2).ravel(), (cols % tile - tile / 2).ravel()
    where = usable.ravel()
    index, y, x, v = tiles.ravel()[where], y[where], x[where], values.ravel()[where]

    def total(weights: np.ndarray | None = None) -> np.ndarray:
        return np.bincount(index, weights=weights, minlength=count)

    n, sy, sx = total(), total(y), total(x)
    normal = np.stack(
        [
            np.stack([n, sy, sx], -1),
            np.stack([sy, total(y * y), total(x * y)], -1),
            np.stack([sx, total(x * y), total(x * x)], -1),
        ],
        axis=1,
    )
    right = np.stack([total(v), total(v * y), total(v * x)], -1)
    good = n >= tile * tile / 4
    coefficients = np.zeros((count, 3))
    coefficients[good] = np.linalg.solve(normal[good], right[good][..., None])[..., 0]
    keep = good[index]
    c = coefficients[index]
    residual = np.zeros(values.size)
    valid = np.zeros(values.size, dtype=bool)
    positions = np.flatnonzero(where)[keep]
    residual[positions] = (v - c[:, 0] - c[:, 1] * y - c[:, 2] * x)[keep]
    valid[positions] = True
    return residual.reshape(values.shape), valid.reshape(values.shape), tiles


def _autocorrelation(kernel: np.ndarray) -> np.ndarray:
    """Full 2-D autocorrelation of a kernel normalised to unit energy (1 at lag 0)."""
    k = np.asarray(kernel, dtype=np.float64)
    k = k / np.sqrt(np.sum(k**2))
    shape = (2 * k.shape[0] - 1, 2 * k.shape[1] - 1)
    return np.fft.fftshift(np.real(np.fft.ifft2(np.abs(np.fft.fft2(k, s=shape)) ** 2)))


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


# The noise power spectrum from pairs of flat fields.
#
# For a pair at one exposure, (GAT(A) − GAT(B))/√2 is pure GAT-domain noise: the structure, the
# heel effect and the gain map cancel. In the central 80 % of the image its residual mean and
# gradients (a least-squares quadratic surface: the two exposures of a pair are never quite
# equal) are removed, and its |FFT|², zero-padded so that the correlation is linear rather than
# circular, is summed over pairs. The inverse FFT of that sum, divided by the number of pixel
# pairs at each lag, is the noise autocovariance without the bias of a periodogram's lag window.
# One region rather than many small tiles: removing a surface biases every lag by about
# −(number of coefficients)·P(0)/(pixels), P(0) the spectrum at zero frequency (6 for a
# Gaussian kernel of σ 0.7 px), which per 64×64 tile lowered λ by a further 0.4 %. The
# autocovariance is kept to lags of ±14 px (the autocorrelation of the largest kernel stored,
# 15×15); normalised to 1 at lag 0 (unit GAT-domain variance) its FFT is the power spectrum P,
# and κ = fftshift(real(ifft2(√P))) (`kernel_from_correlation`), with only as many lags as the
# correlation measurably reaches, so that the estimation noise of the far lags stays out.
#
# What the GAT-domain correlation is: with quantum noise √(λy)·(n ⊛ K) (‖K‖₂ = 1) and white
# electronic noise, the GAT divides the noise by √(λy + σ_e²), so P = α·|K̂|² + (1 − α) with the
# quantum fraction α = λy/(λy + σ_e²). At low signal electronic noise whitens the spectrum, so κ
# comes from the higher exposures (mean ≥ 0.4 × the highest, so that a doubling series keeps two);
# there α is near 1 on a mammography detector (0.96–0.99 for λ = 0.1 ADU, σ_e = 3 ADU and
# 2000–12000 ADU), and κ is the exact GAT-domain kernel at the average α of those exposures.
#
# White or not: under white noise each lag-1 correlation coefficient (vertical, horizontal) is
# about normal with mean 0 and standard error 1/√M, M the number of pixel pairs behind it. The
# noise counts as white, and no kernel is stored, while both lie within `_WHITE_Z` (4) standard
# errors of 0 (a false "correlated" about once in 8000 calibrations of a white detector).


@dataclass
class _LagSums:
    """Sums of products of detrended GAT-domain noise at lags (dy, dx) ∈ [−L, L]², centred, and their counts."""

    products: np.ndarray
    counts: np.ndarray

    def __add__(self, other: _LagSums) -> _LagSums:
        return _LagSums(self.products + other.products, self.counts + other.counts)

    def correlation(self) -> np.ndarray:
        covariance = self.products / self.counts
        centre = covariance.shape[0] // 2
        return covariance / covariance[centre, centre]


@dataclass(frozen=True)
class _Spectrum:
    kernel: np.ndarray | None
    neighbour_correlations: tuple[float, float]  # (vertical, horizontal)
    standard_error: float
    exposures: np.ndarray | None


def _pair_lag_sums(group: np.ndarray, noise: NoiseModel) -> _LagSums | None:
    """Lag sums of (GAT(a) − GAT(b))/√2 over the pairs of repeats of one exposure; None without a pair."""
    if len(group) < 2:
        return None
    region = _central_roi(group.shape[1:], _SPECTRUM_REGION)
    total: _LagSums | None = None
    for a, b in zip(group[0::2], group[1::2], strict=False):
        difference = (gat_forward(a[region], noise) - gat_forward(b[region], noise)) / np.sqrt(2)
        sums = _lag_sums(difference, _MAX_LAG)
        if sums is None:
            return None
        total = sums if total is None else total + sums
    return total


def _lag_sums(field: np.ndarray, max_lag: int) -> _LagSums | None:
    """Lag sums of `field` less its least-squares quadratic surface; None when it is too small."""
    if min(field.shape) < _MIN_SIDE:
        return None
    residual = field - _quadratic_surface(field)
    shape = (fft.next_fast_len(field.shape[0] + max_lag), fft.next_fast_len(field.shape[1] + max_lag))
    # Zero padding: lags up to max_lag do not wrap around (linear, not circular, correlation).
    correlation = fft.irfft2(np.abs(fft.rfft2(residual, s=shape)) ** 2, s=shape)
    lags = np.arange(-max_lag, max_lag + 1)
    products = correlation[np.ix_(lags % shape[0], lags % shape[1])]
    counts = np.outer(field.shape[0] - np.abs(lags), field.shape[1] - np.abs(lags)).astype(np.float64)
    return _LagSums(products, counts)


def _quadratic_surface(field: np.ndarray) -> np.ndarray:
    """Least-squares fit of 1, y, x, y², xy, x² (products of orthonormal 1-D polynomials: no big design matrix)."""

    def polynomials(n: int) -> np.ndarray:
        t = np.linspace(-1, 1, n)
        return np.linalg.qr(np.stack([np.ones(n), t, t**2], axis=1))[0]  # n × 3, orthonormal columns

    rows, cols = polynomials(field.shape[0]), polynomials(field.shape[1])
    coefficients = rows.T @ field @ cols  # [a, b]: degree a in y, b in x
    coefficients[np.add.outer(np.arange(3), np.arange(3)) > 2] = 0.0  # total degree ≤ 2
    return rows @ coefficients @ cols.T


def _variance_corrections(lag_sums: list[_LagSums | None], means: np.ndarray) -> np.ndarray | None:
    """Per exposure, true over detrended noise variance given the measured correlation; None: none measured.

    The detrending high-pass h keeps Σ_d ρ(d)·(h ⋆ h)(d) of the variance of noise with
    correlation ρ, and `_noise_fields` divides by what it keeps of white noise, Σ h². An exposure
    without repeats takes the factor of the nearest exposure that has them.
    """
    measured = [k for k, sums in enumerate(lag_sums) if sums is not None]
    if not measured:
        return None
    max_lag = _MAX_LAG
    size = int(8 * _DETREND_SIGMA) + 1
    impulse = np.zeros((size, size))
    impulse[size // 2, size // 2] = 1.0
    padded = 2 * size  # linear, not circular, autocorrelation of the response
    autocorrelation = fft.irfft2(np.abs(fft.rfft2(_high_pass(impulse), s=(padded, padded))) ** 2, s=(padded, padded))
    lags = np.arange(-max_lag, max_lag + 1) % padded
    window = autocorrelation[np.ix_(lags, lags)]
    factors = {}
    for k in measured:
        sums = lag_sums[k]
        assert sums is not None
        factors[k] = _high_pass_gain() / float(np.sum(sums.correlation() * window))
    nearest = [min(measured, key=lambda k: abs(means[k] - mean)) for mean in means]
    return np.array([factors[k] for k in nearest])


def _noise_spectrum(lag_sums: list[_LagSums | None], means: np.ndarray, exposures: np.ndarray) -> _Spectrum:
    """κ and the neighbour correlations from the higher exposures that have repeats."""
    measured = [k for k, sums in enumerate(lag_sums) if sums is not None]
    if not measured:
        return _Spectrum(None, (float("nan"), float("nan")), float("nan"), None)
    highest = max(means[k] for k in measured)
    used = [k for k in measured if means[k] >= _KERNEL_EXPOSURES * highest]
    sums = [lag_sums[k] for k in used]
    weights = np.array([s.counts[_MAX_LAG, _MAX_LAG] for s in sums if s is not None])  # pixels
    weights /= weights.sum()
    correlation = np.tensordot(weights, np.array([s.correlation() for s in sums if s is not None]), axes=1)
    correlation = (correlation + correlation[::-1, ::-1]) / 2  # exactly symmetric
    # Standard error of each lag's coefficient for white noise: 1/√(pixel pairs), combined over exposures.
    white_error = np.sqrt(np.tensordot(weights**2, np.array([1.0 / s.counts for s in sums if s is not None]), axes=1))
    vertical = float(correlation[_MAX_LAG + 1, _MAX_LAG])
    horizontal = float(correlation[_MAX_LAG, _MAX_LAG + 1])
    standard_error = float(white_error[_MAX_LAG, _MAX_LAG + 1])
    if max(abs(vertical), abs(horizontal)) < _WHITE_Z * standard_error:
        return _Spectrum(None, (vertical, horizontal), standard_error, exposures[used])
    # How far the correlation reaches: the farthest lag (Chebyshev distance) whose coefficient exceeds
    # `_SIGNIFICANT_Z` standard errors (Bartlett: beyond the correlation's reach a coefficient's
    # variance is Σ_k ρ(k)² times white noise's). A smooth correlation's tail goes on below that
    # level, so twice as many lags are kept; the rest, mostly estimation noise, are dropped.
    error = white_error * np.sqrt(np.sum(correlation**2))
    significant = np.abs(correlation) > _SIGNIFICANT_Z * error
    significant[_MAX_LAG, _MAX_LAG] = True
    dy, dx = np.nonzero(significant)
    reach = int(max(np.max(np.abs(dy - _MAX_LAG)), np.max(np.abs(dx - _MAX_LAG)), 1))
    kernel = kernel_from_correlation(correlation, min(2 * reach, _MAX_LAG))
    return _Spectrum(kernel, (vertical, horizontal), standard_error, exposures[used])


def kernel_from_correlation(correlation: np.ndarray, reach: int | None = None, grid: int = 64) -> np.ndarray:
    """κ from a centred, symmetric autocorrelation ρ (1 at lag 0): κ = fftshift(real(ifft2(√P))), P = FFT(ρ).

    `reach` (default: all of ρ) is the largest lag kept: a (2r+1)-sided kernel has an
    autocorrelation reaching lag 2r, so the kernel is at most 2·⌈reach/2⌉ + 1 sided (and at most
    `_MAX_KERNEL`); within that it is cropped to the smallest odd square (3×3 at least) holding
    `_KERNEL_ENERGY` of its energy and renormalised to ‖κ‖₂ = 1. Negative spectrum values
    (estimation noise where the spectrum is near 0) are set to 0.
    """
    max_lag = correlation.shape[0] // 2
    reach = max_lag if reach is None else min(reach, max_lag)
    kept = correlation[max_lag - reach : max_lag + reach + 1, max_lag - reach : max_lag + reach + 1]
    lags = np.arange(-reach, reach + 1) % grid
    embedded = np.zeros((grid, grid))
    embedded[np.ix_(lags, lags)] = kept
    spectrum = np.maximum(np.real(np.fft.fft2(embedded)), 0.0)
    full = np.fft.fftshift(np.real(np.fft.ifft2(np.sqrt(spectrum))))
    centre, energy = grid // 2, float(np.sum(full**2))
    largest = min(max(2 * ((reach + 1) // 2) + 1, 3), _MAX_KERNEL)
    for size in range(3, largest + 1, 2):
        radius = size // 2
        kernel = full[centre - radius : centre + radius + 1, centre - radius : centre + radius + 1]
        if np.sum(kernel**2) >= _KERNEL_ENERGY * energy:
            break
    return kernel / np.sqrt(np.sum(kernel**2))


def kernel_neighbour_correlations(kernel: np.ndarray | None) -> tuple[float, float]:
    """(vertical, horizontal) lag-1 correlation of noise κ ⊛ n with ‖κ‖₂ = 1; (0, 0) for white (None)."""
    if kernel is None:
        return 0.0, 0.0
    k = np.asarray(kernel, dtype=np.float64)
    k = k / np.sqrt(np.sum(k**2))
    vertical = float(np.sum(k[1:, :] * k[:-1, :]))
    horizontal = float(np.sum(k[:, 1:] * k[:, :-1]))
    return vertical, horizontal
