"""Per-image QC figures that mean what they say (docs/qc.md has every figure, its normal range
and why).

The central measurement is the noise level of an image in the variance-stabilised (GAT) domain,
where a correctly calibrated detector's noise has standard deviation 1 at every signal level.
A breast is not flat: its anatomical texture has a power-law spectrum A·f^−β that, at the pixel
scale of a high-count image, can hold as much power as the quantum noise. So the noise is not
read off a high-pass residual alone: in tiles inside the breast, the power spectrum of the
Laplacian-filtered image (prewhitened, so the steep texture spectrum does not leak) is fitted
with |L(f)|²·(σ²·|K(f)|² + A·f^−β) — white (or, with a kernel κ, coloured) noise plus a
power-law texture — and σ is the noise level with the texture's contribution removed.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage, optimize

from dicom_node.restore.calibration import background_noise_std
from dicom_node.restore.gat import gat_forward
from dicom_node.restore.mask import breast_mask
from dicom_node.restore.noise import NoiseModel

TILE = 64  # px: the spectrum's resolution
MIN_TILES = 64  # fewer (a breast smaller than about 300×300 px, far below any mammogram) give no figure: too rough
MAX_TILES = 512  # evenly spread over a larger breast: precise enough, and memory stays small
LOWEST_FREQUENCY = 0.08  # cycles/px: below it the breast's shape, not its texture, dominates the spectrum
SNR_BOX = 15  # px: the seed paper's SNR window
_LAPLACIAN = np.array([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
_STARTS = [(s2, beta) for s2 in (0.3, 1.0, 3.0) for beta in (2.0, 3.0, 4.0)]


def noise_level(gat_image: np.ndarray, mask: np.ndarray, kernel: np.ndarray | None = None) -> float:
    """Std of the noise of a GAT-domain image inside `mask`, anatomical texture removed; NaN when
    the mask holds fewer than MIN_TILES tiles. `kernel` is the noise's correlation κ (None: white)."""
    spectra = _tile_spectra([gat_image], mask)
    return float("nan") if spectra is None else float(np.sqrt(_fitted_noise_power(spectra[0], kernel)))


def noise_levels_before_after(
    gat_before: np.ndarray, gat_after: np.ndarray, mask: np.ndarray, kernel: np.ndarray | None = None
) -> tuple[float, float]:
    """Noise std of an image before and after a restoration, both in one GAT domain.

    Before: the fitted (white or κ-coloured) noise. After: the restored noise is not white, so it
    is not fitted; it is inferred from the method noise m = before − after, which holds no anatomy
    when the restorer kept it. A restorer that shrinks each frequency's noise by a gain H(f) leaves
    m with spectrum (1 − H)²·N and the output's noise with H²·N, N the input's noise spectrum; so
    H = 1 − √(M/N) per frequency, and the output's noise is the mean of H²·N. Structure in m
    (a blur) reads as more noise removed: `method_noise_structure` tells that case apart.
    """
    spectra = _tile_spectra([gat_before, gat_before - gat_after], mask)
    if spectra is None:
        return float("nan"), float("nan")
    before, method_noise = spectra
    noise_power = _fitted_noise_power(before, kernel)
    used, unit_noise = _noise_band(before.shape[0], kernel)
    noise = noise_power * unit_noise[used]
    kept = np.clip(1.0 - np.sqrt(method_noise[used] / noise), 0.0, 1.0)
    return float(np.sqrt(noise_power)), float(np.sqrt(noise_power * np.mean(kept**2)))


def _tile_spectra(images: list[np.ndarray], mask: np.ndarray) -> list[np.ndarray] | None:
    """Mean power spectra of the Laplacian of each image over the same half-overlapping tiles
    inside `mask` (eroded past the filter's reach); None when fewer than MIN_TILES fit."""
    inner = ndimage.binary_erosion(mask, iterations=2)
    step = TILE // 2
    inside = sliding_window_view(inner, (TILE, TILE))[::step, ::step].all(axis=(2, 3))
    count = np.count_nonzero(inside)
    if count < MIN_TILES:
        return None
    if count > MAX_TILES:
        keep = np.zeros(count, dtype=bool)
        keep[np.linspace(0, count - 1, MAX_TILES).astype(int)] = True
        inside[inside] = keep
    taper = np.outer(np.hanning(TILE), np.hanning(TILE))
    taper /= np.sqrt(np.mean(taper**2))
    spectra = []
    for image in images:
        laplacian = ndimage.correlate(np.asarray(image, dtype=np.float64), _LAPLACIAN, mode="nearest")
        tiles = sliding_window_view(laplacian, (TILE, TILE))[::step, ::step][inside]
        tiles = tiles - tiles.mean(axis=(1, 2), keepdims=True)
        spectra.append(np.mean(np.abs(np.fft.fft2(tiles * taper)) ** 2, axis=0) / TILE**2)
    return spectra


def _noise_band(tile: int, kernel: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The frequencies used (≥ LOWEST_FREQUENCY) and, on the tile's grid, the Laplacian-domain
    spectrum of unit-variance noise, |L(f)|²·|K(f)|²."""
    fy, fx = np.meshgrid(np.fft.fftfreq(tile), np.fft.fftfreq(tile), indexing="ij")
    laplacian_gain = (4 * np.sin(np.pi * fy) ** 2 + 4 * np.sin(np.pi * fx) ** 2) ** 2
    noise_shape = np.ones_like(fy) if kernel is None else _kernel_power(kernel, tile)
    return np.hypot(fy, fx) >= LOWEST_FREQUENCY, laplacian_gain * noise_shape


def _fitted_noise_power(spectrum: np.ndarray, kernel: np.ndarray | None) -> float:
    """σ² of the fit |L|²·(σ²|K|² + A f^−β) to a Laplacian-domain spectrum."""
    tile = spectrum.shape[0]
    fy, fx = np.meshgrid(np.fft.fftfreq(tile), np.fft.fftfreq(tile), indexing="ij")
    used, noise_spectrum = _noise_band(tile, kernel)
    laplacian_gain = (4 * np.sin(np.pi * fy) ** 2 + 4 * np.sin(np.pi * fx) ** 2) ** 2
    f, measured = np.hypot(fy, fx)[used], spectrum[used]
    gain, noise_part = laplacian_gain[used], noise_spectrum[used]

    def whittle(params: np.ndarray) -> float:
        """Negative log-likelihood of periodogram values around the model (Whittle): unbiased
        however few tiles are averaged, where a least-squares fit on any scale is not."""
        noise_power, log_amplitude, beta = params
        model = noise_power * noise_part + gain * np.exp(log_amplitude) * f ** (-beta)
        return float(np.sum(np.log(model) + measured / model))

    bounds = [(1e-6, 1e4), (-60.0, 60.0), (0.5, 6.0)]
    best = min(
        (
            optimize.minimize(
                whittle,
                [s2, np.log(np.median(measured / gain)) + beta * np.log(0.3), beta],
                bounds=bounds,
                method="L-BFGS-B",
            )
            for s2, beta in _STARTS
        ),
        key=lambda fit: fit.fun,
    )
    return float(best.x[0])


def _kernel_power(kernel: np.ndarray, tile: int) -> np.ndarray:
    """|K(f)|² of the noise kernel κ on a tile's frequency grid (mean 1: κ has unit energy)."""
    padded = np.zeros((tile, tile))
    k = np.asarray(kernel, dtype=np.float64)
    padded[: k.shape[0], : k.shape[1]] = k
    return np.abs(np.fft.fft2(padded)) ** 2


def image_qc(
    raw: np.ndarray,
    restored: np.ndarray,
    noise: NoiseModel,
    dose_fraction: float,
    *,
    saturation: float | None = None,
    pixel_area_mm2: float | None = None,
) -> dict[str, float]:
    """Every restorer's common QC figures: the calibration check on the input, the restoration's
    figures (`restoration_qc`), and the breast's area and saturated fraction (input pixels at
    `saturation`, the largest storable value). NaN where a figure is undefined (no breast found,
    too small a breast, no pixel spacing)."""
    mask = breast_mask(raw, noise)
    area = float(np.count_nonzero(mask) * pixel_area_mm2 / 100) if pixel_area_mm2 else float("nan")
    saturated = float(np.mean(raw[mask] >= saturation)) if saturation is not None and mask.any() else float("nan")
    return {
        "breast_area_cm2": area,
        "saturated_fraction": saturated,
        **calibration_check(raw, noise, mask),
        **restoration_qc(raw, restored, noise, dose_fraction, mask),
    }


def calibration_check(raw: np.ndarray, noise: NoiseModel, mask: np.ndarray) -> dict[str, float]:
    """calibration_noise_std: the input's GAT-domain noise std (1 when τ, λ, σ_e and κ are right);
    calibration_gain_ratio: its square, ≈ the λ the image implies over the configured λ.

    White noise is measured in the breast, its texture removed (`noise_level`). Correlated noise (a
    kernel κ) has most of its power at low frequencies, as the texture does, so one image's
    spectrum cannot tell the two apart: it is measured in the direct-exposure background instead
    (`background_noise_std`; NaN without enough background)."""
    if noise.kernel is None:
        std = noise_level(gat_forward(raw, noise), mask)
    else:
        std = background_noise_std(raw, noise, mask)
    return {"calibration_noise_std": std, "calibration_gain_ratio": std**2}


def restoration_qc(
    raw: np.ndarray, restored: np.ndarray, noise: NoiseModel, dose_fraction: float, mask: np.ndarray
) -> dict[str, float]:
    """Figures of one restoration, both images on the full-dose scale (the input rescaled):

    - noise_before, noise_after: the noise level of the rescaled input and of the output relative
      to a full-dose image's (both measured in the full-dose GAT domain, where a full-dose image's
      noise is 1): ≈ 1/√r before, 1 after a restoration that reaches full dose;
    - snr_before, snr_after: mean over the breast of local mean / local std in 15×15 boxes;
    - method_noise_structure: correlation of the method noise (input − output) with the output's
      edges (its smoothed Laplacian): ≈ 0 when only noise was removed, clearly positive when the
      restorer removed structure (blur).
    The mean's preservation (mean_ratio) each restorer measures on its own breast mask.
    """
    nan = float("nan")
    rescaled = (raw - noise.offset) / dose_fraction + noise.offset
    if not mask.any():
        return dict.fromkeys(("noise_before", "noise_after", "snr_before", "snr_after", "method_noise_structure"), nan)
    noise_before, noise_after = noise_levels_before_after(
        gat_forward(rescaled, noise), gat_forward(restored, noise), mask, noise.kernel
    )
    return {
        "noise_before": noise_before,
        "noise_after": noise_after,
        "snr_before": mean_snr(rescaled - noise.offset, mask),
        "snr_after": mean_snr(restored - noise.offset, mask),
        "method_noise_structure": method_noise_structure(rescaled, restored, mask),
    }


def mean_snr(image: np.ndarray, mask: np.ndarray, box: int = SNR_BOX) -> float:
    """Mean over the breast (boxes wholly inside it) of local mean / local std in box×box windows."""
    mean = ndimage.uniform_filter(image, box, mode="reflect")
    variance = np.maximum(ndimage.uniform_filter(image**2, box, mode="reflect") - mean**2, 1e-12)
    inside = ndimage.binary_erosion(mask, iterations=box // 2)
    if not inside.any():
        return float("nan")
    return float(np.mean(mean[inside] / np.sqrt(variance[inside])))


def method_noise_structure(rescaled: np.ndarray, restored: np.ndarray, mask: np.ndarray) -> float:
    """Correlation, in the breast, of input − output with −∇²(output smoothed at 2 px): what a blur
    removes is the image's own Laplacian, so structure in the method noise lines up with it."""
    method_noise = rescaled - restored
    edges = -ndimage.gaussian_laplace(restored, 2.0)
    inside = ndimage.binary_erosion(mask, iterations=8)
    if np.count_nonzero(inside) < 100:
        return float("nan")
    a, b = method_noise[inside], edges[inside]
    a, b = a - a.mean(), b - b.mean()
    scale = float(np.sqrt(np.sum(a**2) * np.sum(b**2)))
    return float(np.sum(a * b) / scale) if scale else float("nan")
