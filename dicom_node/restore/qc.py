"""Per-image QC figures that mean what they say (docs/qc.md has every figure, its normal range
and why).

The central measurement is the noise level of an image in the variance-stabilised (GAT) domain,
where a correctly calibrated detector's noise has standard deviation 1 at every signal level.
A breast is not flat: its anatomical texture has a power-law spectrum A·f^−β that, at the pixel
scale of a high-count image, can hold as much power as the quantum noise. So the noise is not
read off a high-pass residual alone: in tiles inside the breast, the power spectrum of the
Laplacian-filtered image (prewhitened, so the steep texture spectrum does not leak) is fitted
with |L(f)|²·(σ² + A·f^−β) — white noise plus a power-law texture — and σ is the noise level with
the texture's contribution removed. Correlated noise (a kernel κ) cannot be told from texture in
one spectrum; it is measured in the direct-exposure background instead.

Every figure is computed on one sample of at most MAX_TILES tiles (and their margins), not on the
whole image: a full-field mammogram costs a few hundred 64×64 tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage, optimize

from dicom_node.restore.calibration import background_noise_std
from dicom_node.restore.gat import gat_forward
from dicom_node.restore.mask import breast_mask
from dicom_node.restore.noise import NoiseModel

TILE = 64  # px: the spectrum's resolution
MIN_TILES = 64  # fewer (a breast smaller than about 300×300 px, far below any mammogram) give no figure: too rough
MAX_TILES = 512  # evenly spread over a larger breast: precise enough, and fast
LOWEST_FREQUENCY = 0.08  # cycles/px: below it the breast's shape, not its texture, dominates the spectrum
SNR_BOX = 15  # px: the seed paper's SNR window
EDGE_SCALE = 2.0  # px: the smoothing of the output whose Laplacian marks its edges
_MARGIN = 8  # px around each tile: the edge filter's reach
_STARTS = [(s2, beta) for s2 in (0.3, 1.0, 3.0) for beta in (2.0, 3.0, 4.0)]


@dataclass(frozen=True)
class Tiles:
    """Tiles of TILE px inside a breast (with a margin of _MARGIN px, also inside), half-overlapping,
    at most MAX_TILES spread evenly; `of` gives None when fewer than MIN_TILES fit."""

    rows: np.ndarray  # top-left corner of each tile (margin excluded)
    cols: np.ndarray

    @classmethod
    def of(cls, mask: np.ndarray) -> Tiles | None:
        side = TILE + 2 * _MARGIN
        if min(mask.shape) < side:
            return None
        step = TILE // 2
        inside = sliding_window_view(mask, (side, side))[::step, ::step].all(axis=(2, 3))
        rows, cols = np.nonzero(inside)
        return cls._spread(rows, cols, step, MIN_TILES)

    @classmethod
    def covering(cls, mask: np.ndarray) -> Tiles | None:
        """Side-by-side tiles (margin inside the image) that hold any pixel of `mask`: the skin
        line too, where a blur shows most."""
        side = TILE + 2 * _MARGIN
        if min(mask.shape) < side or not mask.any():
            return None
        touched = sliding_window_view(mask[_MARGIN:, _MARGIN:], (TILE, TILE))[::TILE, ::TILE].any(axis=(2, 3))
        rows, cols = np.nonzero(touched)
        fits = (rows * TILE + side <= mask.shape[0]) & (cols * TILE + side <= mask.shape[1])
        return cls._spread(rows[fits], cols[fits], TILE, 1)

    @classmethod
    def _spread(cls, rows: np.ndarray, cols: np.ndarray, step: int, least: int) -> Tiles | None:
        if rows.size < least:
            return None
        keep = np.linspace(0, rows.size - 1, min(rows.size, MAX_TILES)).astype(int)
        return cls(rows[keep] * step + _MARGIN, cols[keep] * step + _MARGIN)

    def cut(self, image: np.ndarray, margin: int = 0) -> np.ndarray:
        """The tiles of `image` with `margin` px around each (≤ _MARGIN): shape (n, T+2m, T+2m)."""
        offsets = np.arange(-margin, TILE + margin)
        rows = (self.rows[:, None] + offsets)[:, :, None]
        cols = (self.cols[:, None] + offsets)[:, None, :]
        return np.asarray(image, dtype=np.float64)[rows, cols]


def _spectrum(windows: np.ndarray) -> np.ndarray:
    """Mean power spectrum of the Laplacian of tiles cut with a 1-px margin."""
    laplacian = (
        windows[:, :-2, 1:-1] + windows[:, 2:, 1:-1] + windows[:, 1:-1, :-2] + windows[:, 1:-1, 2:]
    ) - 4 * windows[:, 1:-1, 1:-1]
    laplacian = laplacian - laplacian.mean(axis=(1, 2), keepdims=True)
    taper = np.outer(np.hanning(TILE), np.hanning(TILE))
    taper /= np.sqrt(np.mean(taper**2))
    return np.mean(np.abs(np.fft.fft2(laplacian * taper)) ** 2, axis=0) / TILE**2


def noise_level(gat_image: np.ndarray, mask: np.ndarray) -> float:
    """Std of the white noise of a GAT-domain image inside `mask`, anatomical texture removed; NaN
    when the mask holds fewer than MIN_TILES tiles."""
    tiles = Tiles.of(mask)
    return float("nan") if tiles is None else float(np.sqrt(_fitted_noise_power(_spectrum(tiles.cut(gat_image, 1)))))


def _noise_band(kernel: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The frequencies used (≥ LOWEST_FREQUENCY) and, on a tile's grid, the Laplacian-domain
    spectrum of unit-variance noise, |L(f)|²·|K(f)|²."""
    fy, fx = np.meshgrid(np.fft.fftfreq(TILE), np.fft.fftfreq(TILE), indexing="ij")
    laplacian_gain = (4 * np.sin(np.pi * fy) ** 2 + 4 * np.sin(np.pi * fx) ** 2) ** 2
    noise_shape = np.ones_like(fy) if kernel is None else _kernel_power(kernel, TILE)
    return np.hypot(fy, fx) >= LOWEST_FREQUENCY, laplacian_gain * noise_shape


def _fitted_noise_power(spectrum: np.ndarray) -> float:
    """σ² of the fit |L|²·(σ² + A f^−β) to a Laplacian-domain spectrum (white noise)."""
    used, gain = _noise_band(None)
    fy, fx = np.meshgrid(np.fft.fftfreq(TILE), np.fft.fftfreq(TILE), indexing="ij")
    f, measured, gain = np.hypot(fy, fx)[used], spectrum[used], gain[used]

    def whittle(params: np.ndarray) -> float:
        """Negative log-likelihood of periodogram values around the model (Whittle): unbiased
        however few tiles are averaged, where a least-squares fit on any scale is not."""
        noise_power, log_amplitude, beta = params
        model = gain * (noise_power + np.exp(log_amplitude) * f ** (-beta))
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
    calibration = calibration_check(raw, noise, mask)
    return {
        "breast_area_cm2": area,
        "saturated_fraction": saturated,
        **calibration,
        **restoration_qc(raw, restored, noise, dose_fraction, mask, calibration["calibration_noise_std"]),
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


_RESTORATION_FIGURES = ("noise_before", "noise_after", "snr_before", "snr_after", "method_noise_structure")


def restoration_qc(
    raw: np.ndarray,
    restored: np.ndarray,
    noise: NoiseModel,
    dose_fraction: float,
    mask: np.ndarray,
    calibration_std: float | None = None,
) -> dict[str, float]:
    """Figures of one restoration, both images on the full-dose scale (the input rescaled), on the
    breast's tiles (NaN when fewer than MIN_TILES fit):

    - noise_before, noise_after: the noise of the rescaled input and of the output relative to a
      full-dose image's (the full-dose GAT domain, where a full-dose image's noise is 1): ≈ 1/√r
      before, 1 after a restoration that reaches full dose. Before is fitted (white noise); with a
      kernel κ it is the noise model's prediction at the breast's mean signal, scaled by the
      calibration check (`calibration_std`, measured in the background). After is inferred from
      the method noise (`_noise_after`);
    - snr_before, snr_after: mean over the breast's 15×15 boxes of mean / std;
    - method_noise_structure: correlation of the method noise (input − output) with the output's
      edges (−∇² of it smoothed at 2 px): ≈ 0 when only noise was removed, clearly positive when
      the restorer removed structure (blur).
    The mean's preservation (mean_ratio) each restorer measures on its own breast mask.
    """
    tiles = Tiles.of(mask)
    if tiles is None:
        return dict.fromkeys(_RESTORATION_FIGURES, float("nan"))
    rescaled = tiles.cut((raw - noise.offset) / dose_fraction + noise.offset, _MARGIN)
    output = tiles.cut(restored, _MARGIN)
    tile_noise = NoiseModel(_tile_gain(tiles, noise), noise.electronic_noise, noise.offset, noise.kernel)
    one = slice(_MARGIN - 1, -_MARGIN + 1)
    gat_before = gat_forward(rescaled[:, one, one], tile_noise)
    gat_after = gat_forward(output[:, one, one], tile_noise)
    if noise.kernel is None:
        noise_power = _fitted_noise_power(_spectrum(gat_before))
    else:
        signal = float(np.mean(rescaled - noise.offset))
        gain = float(np.mean(tile_noise.gain))
        predicted = (gain * signal / dose_fraction + (noise.electronic_noise / dose_fraction) ** 2) / (
            gain * signal + noise.electronic_noise**2
        )
        noise_power = predicted * (calibration_std if calibration_std is not None else 1.0) ** 2
    centre = slice(_MARGIN, -_MARGIN)
    return {
        "noise_before": float(np.sqrt(noise_power)),
        "noise_after": _noise_after(noise_power, _spectrum(gat_before - gat_after), noise.kernel),
        "snr_before": _mean_snr(rescaled[:, centre, centre] - noise.offset),
        "snr_after": _mean_snr(output[:, centre, centre] - noise.offset),
        "method_noise_structure": method_noise_structure(
            (raw - noise.offset) / dose_fraction + noise.offset, restored, mask
        ),
    }


def _tile_gain(tiles: Tiles, noise: NoiseModel) -> float | np.ndarray:
    """λ for the tiles cut with a 1-px margin (a per-pixel gain map is cut like the image)."""
    if np.ndim(noise.gain) == 0:
        return noise.gain
    return tiles.cut(np.asarray(noise.gain), 1)


def _noise_after(noise_power: float, method_noise: np.ndarray, kernel: np.ndarray | None) -> float:
    """The output's noise, inferred from the method noise's spectrum M and the input's noise N.

    The restored noise is not white, so it is not fitted. The method noise m = input − output holds
    no anatomy when the restorer kept it; a restorer that shrinks each frequency's noise by a gain
    H(f) leaves m with spectrum (1 − H)²·N and the output's noise with H²·N. So H = 1 − √(M/N) per
    frequency, and the output's noise is the mean of H²·N. Anatomy in m (a blur, texture removed)
    reads as more noise removed: `method_noise_structure` tells that case apart.
    """
    used, unit_noise = _noise_band(kernel)
    kept = np.clip(1.0 - np.sqrt(method_noise[used] / (noise_power * unit_noise[used])), 0.0, 1.0)
    shape = np.ones(int(np.count_nonzero(used))) if kernel is None else _kernel_power(kernel, TILE)[used]
    return float(np.sqrt(noise_power * np.mean(kept**2 * shape)))


def _mean_snr(tiles: np.ndarray, box: int = SNR_BOX) -> float:
    """Mean over the box×box blocks of the tiles of block mean / block std."""
    n = tiles.shape[1] // box
    blocks = tiles[:, : n * box, : n * box].reshape(len(tiles), n, box, n, box)
    std = blocks.std(axis=(2, 4))
    return float(np.mean(blocks.mean(axis=(2, 4)) / np.maximum(std, 1e-12)))


def method_noise_structure(rescaled: np.ndarray, restored: np.ndarray, mask: np.ndarray) -> float:
    """Correlation of input − output with −∇²(output smoothed at EDGE_SCALE) over the breast (8 px in
    from the skin line), on tiles covering it: what a blur removes is the image's own Laplacian, so
    structure in the method noise lines up with it — mostly at the skin line and calcifications,
    hardly in the random texture inside. NaN when too little of the breast is left."""
    inner = ndimage.binary_erosion(mask, iterations=8)
    tiles = Tiles.covering(inner)
    if tiles is None:
        return float("nan")
    centre = slice(_MARGIN, -_MARGIN)
    output = tiles.cut(restored, _MARGIN)
    scale = (0.0, EDGE_SCALE, EDGE_SCALE)  # within each tile only: no derivative across the stack
    laplacian = ndimage.gaussian_filter(output, scale, order=(0, 2, 0)) + ndimage.gaussian_filter(
        output, scale, order=(0, 0, 2)
    )
    edges = -laplacian[:, centre, centre]
    method_noise = tiles.cut(rescaled, 0) - output[:, centre, centre]
    used = tiles.cut(inner, 0) > 0
    if np.count_nonzero(used) < 100:
        return float("nan")
    a, b = method_noise[used], edges[used]
    a, b = a - a.mean(), b - b.mean()
    norm = float(np.sqrt(np.sum(a**2) * np.sum(b**2)))
    return float(np.sum(a * b) / norm) if norm else float("nan")
