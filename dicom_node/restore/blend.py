"""Blends of a low-dose image z with a denoised estimate D into an image with full-dose noise.

A denoised image alone has too little noise (it does not look like a full-dose acquisition);
the low-dose image alone has too much. Every blend here keeps the mean exactly (its weights sum
to 1/r, r the dose fraction) and chooses how much of each to keep so that the output's noise is
that of a real full-dose image:

- `blend` / `blend_weights`: one weight per pixel. Exact for a noise-free D (science.md); given the
  estimate's own noise statistics per pixel (`estimate_noise_statistics`), exact for a noisy one.
- `noise_level_maps`: what a conditioned denoiser is told about the blend to come (the noise level
  it must land at, per pixel, and the noise's correlation).
- `spectral_blend`: one weight per spatial frequency (statistics in smoothed frequency bands), the
  least-bias way to reach the full-dose variance: a denoiser's leftover noise sits at low
  frequencies and the texture it removes at high ones, so the two are traded where each is cheap.

Names: f = GAT(z) and D are GAT-domain (input noise variance 1 there); n is the input's noise,
ε = D − E[D] the estimate's, v = var(ε), c = cov(n, ε), both in units of the input's variance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
from scipy import ndimage

from dicom_node.restore.calibration import kernel_neighbour_correlations
from dicom_node.restore.denoisers import Denoiser
from dicom_node.restore.gat import gat_inverse
from dicom_node.restore.noise import NoiseModel

Blend = Literal["plain", "noise-aware", "spectral"]  # the blends a profile can choose
BLEND_MODES = get_args(Blend)
_LOCAL_WINDOW = 8.0  # px, Gaussian σ of the local averages behind the per-pixel noise statistics
_PROBE_STEP = 0.3  # probe size in units of the GAT-domain noise std: large enough to average over
#   BM3D's discontinuities (0.05 gave spiky differences), small enough to stay at this noise level
PIXEL_PROBES = 2  # per-pixel statistics average few pixels: two probes
SPECTRAL_PROBES = 1  # spectral statistics average hundreds of frequencies each: one probe is enough
_SPECTRAL_SMOOTHING = 1 / 16  # Gaussian σ of the frequency smoothing, as a fraction of each axis: wide,
#   because the bias spectrum is read from the image's own residual, whose noise would otherwise steer
#   the weights towards keeping this image's strongest noise (+7 % noise at 1/64 on a 96×80 test)
_SMOOTHING_MIN_BINS = 4.0
_BLOCKS_PER_AXIS = 64  # frequency blocks per axis, one weight each (the spectra are smooth at that scale)
_TARGET_LEVELS = 4  # full-dose variance levels solved for when it varies over the breast
_MU_RANGE = (1e-8, 1e8)  # bisection range of the Lagrange multiplier (bias power per noise power)


# --- one weight per pixel -------------------------------------------------------------------


def blend_weights(
    estimate_raw: np.ndarray,
    noise: NoiseModel,
    dose_fraction: float,
    estimate_variance: np.ndarray | float = 0.0,
    estimate_covariance: np.ndarray | float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(ω₁, ω₂) of `blend`: ω₁ + ω₂ = 1/r (unbiased mean) and the output has full-dose variance.

    With r the dose fraction, ŷ = (D − τ)/r, v_low = rλŷ + σ_e², v_full = λŷ + σ_e², ρ² = v_full/v_low:
    - a noise-free estimate D (science.md, the defaults): ω₁ = ρ, so ω₁²·v_low = v_full.
    - an estimate with error ε, s² = var(ε)/v_low and c = cov(n, ε)/v_low (n the input's noise):
      the output noise ω₁n + ω₂ε has variance v_low·(ω₁²·a + 2ω₁(c − s²)/r + s²/r²), with
      a = 1 + s² − 2c = var(n − ε)/v_low; ω₁ is the non-negative root of that = v_full, or 0
      where the estimate alone is already noisier than the target.
    """
    signal = (np.asarray(estimate_raw, dtype=np.float64) - noise.offset) / dose_fraction
    target = noise.variance(signal) / noise.variance(dose_fraction * signal)  # ρ²
    q = 1.0 / dose_fraction
    s2, c = np.asarray(estimate_variance, dtype=np.float64), np.asarray(estimate_covariance, dtype=np.float64)
    a = np.maximum(1.0 + s2 - 2.0 * c, 1e-6)
    half_b = q * (c - s2)
    discriminant = np.maximum(half_b**2 - a * (q**2 * s2 - target), 0.0)
    w_low = np.maximum((np.sqrt(discriminant) - half_b) / a, 0.0)
    return w_low, q - w_low


NOISE_LEVEL_MAPS = 2  # channels of `noise_level_maps`


def noise_level_maps(gat_image: np.ndarray, noise: NoiseModel, dose_fraction: float) -> np.ndarray:
    """[2, H, W] float32 noise-level maps of a low-dose image (GAT domain), for a conditioned
    denoiser (FFDNet's idea: one network for several doses and detectors).

    0: r·ω₁ of the plain blend, the full-dose noise std in units of the input's (√r where quantum
       noise dominates, towards r where electronic noise does): the level a restoration must land at;
    1: the noise's lag-1 neighbour correlation (mean of vertical and horizontal; 0: white), constant.
    Both come from the noise model and the image itself, so training and inference compute them alike.
    """
    low_dose = gat_inverse(gat_image, noise)
    w_low, _ = blend_weights(low_dose, noise, dose_fraction)
    correlation = float(np.mean(kernel_neighbour_correlations(noise.kernel)))
    return np.stack([dose_fraction * w_low, np.full(w_low.shape, correlation)]).astype(np.float32)


def blend(
    z: np.ndarray,
    estimate_raw: np.ndarray,
    noise: NoiseModel,
    dose_fraction: float,
    estimate_variance: np.ndarray | float = 0.0,
    estimate_covariance: np.ndarray | float = 0.0,
) -> np.ndarray:
    """ω₁(z − τ) + ω₂(D − τ) + τ: the target-dose image, offset kept (weights: `blend_weights`).

    Without the estimate's noise statistics this is science.md's blend, exact for a noise-free D.
    """
    weights = blend_weights(estimate_raw, noise, dose_fraction, estimate_variance, estimate_covariance)
    return combine(z, estimate_raw, noise.offset, *weights)


def combine(
    z: np.ndarray, estimate_raw: np.ndarray, offset: float, w_low: np.ndarray, w_estimate: np.ndarray
) -> np.ndarray:
    """ω₁(z − τ) + ω₂(D − τ) + τ for given weights."""
    return (
        w_low * (np.asarray(z, dtype=np.float64) - offset) + w_estimate * (np.asarray(estimate_raw) - offset) + offset
    )


def probe_responses(
    denoiser: Denoiser,
    gat_image: np.ndarray,
    count: int,
    seed: int = 0,
    kernel: np.ndarray | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`count` pairs (b, r): a probe b distributed like the input's noise and the denoiser's response.

    Near f the denoiser acts on a small noise perturbation like a linear operator H, so
    r = (D(f + δb) − D(f − δb))/2δ ≈ Hb: the estimate's error caused by noise b. The central
    difference cancels the even-order part of BM3D's nonlinear response (its thresholds switching),
    which a one-sided difference counts as noise: on unseen phantoms it overstated the estimate's
    noise, and the blends undershot full-dose noise by up to 10 % (noisy detector, half dose: RN
    0.91× → 0.96× FD with the central difference). With a kernel κ the
    probes are coloured, b = κ ⊛ w with w white, for two reasons: (1) the blend needs the statistics
    of the noise actually in the image, and a white probe measures those of white noise instead
    (BM3D keeps much more of correlated, low-frequency noise than of white noise); (2) the
    perturbed input f + δb must keep the spectrum the denoiser is told (κ, passed to every call), so
    that the operator being linearised is the one that produced D. Circular convolution ('wrap')
    gives the probe exactly the spectrum `noise_psd` describes. Two denoiser calls per probe.
    """
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(count):
        probe = rng.standard_normal(gat_image.shape)
        if kernel is not None:
            unit = np.asarray(kernel, dtype=np.float64)
            probe = ndimage.convolve(probe, unit / np.sqrt(np.sum(unit**2)), mode="wrap")
        ahead = denoiser(gat_image + _PROBE_STEP * probe, 1.0, kernel)
        behind = denoiser(gat_image - _PROBE_STEP * probe, 1.0, kernel)
        response = (ahead - behind) / (2 * _PROBE_STEP)
        pairs.append((probe, response))
    return pairs


def estimate_noise_statistics(
    denoiser: Denoiser,
    gat_image: np.ndarray,
    seed: int = 0,
    kernel: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Local (s², c) of a GAT-domain estimate D, measured on this image (noise var = 1 there).

    From the probes of `probe_responses` (r ≈ Hb, b distributed like the noise, covariance C = KKᵀ),
    by local averaging: c = cov(n, ε) = (HC)_ii ≈ ⟨b·r⟩ (Stein's divergence, for white noise H_ii)
    and s² = var(ε) = (HCHᵀ)_ii ≈ ⟨r²⟩. (Reading s² from the residual f − D instead counts the
    structure BM3D removed as noise.) Two probes are averaged (four more denoiser calls).
    """
    pairs = probe_responses(denoiser, gat_image, PIXEL_PROBES, seed, kernel)
    products = sum(probe * response for probe, response in pairs) / len(pairs)
    squares = sum(response**2 for _, response in pairs) / len(pairs)
    covariance = np.clip(ndimage.gaussian_filter(products, _LOCAL_WINDOW), 0.0, 0.99)
    variance = np.clip(ndimage.gaussian_filter(squares, _LOCAL_WINDOW), 0.0, 0.99)
    return variance, covariance


# --- one weight per spatial frequency -------------------------------------------------------


@dataclass(frozen=True)
class SpectralStatistics:
    """Power spectra on a grid of frequency blocks, each averaging to a per-pixel variance.

    noise N(k): the input's noise; estimate v(k): the estimate's noise; covariance c(k): their
    cross-spectrum; bias B(k): the power of what the estimate removed besides noise (structure).
    With weight α(k) on the input and 1 − α(k) on the estimate, the output's noise power is
    α²N + (1 − α)²v + 2α(1 − α)c and its bias power (1 − α)²B. `counts` is how many frequencies
    of the image each block stands for (None: one each); a weight is constant over its block, so
    the block means give the image's variance exactly (it is linear in the spectra).
    """

    noise: np.ndarray
    estimate: np.ndarray
    covariance: np.ndarray
    bias: np.ndarray
    counts: np.ndarray | None = None

    def _mean(self, values: np.ndarray) -> float:
        return float(np.mean(values) if self.counts is None else np.sum(values * self.counts) / np.sum(self.counts))

    def weights(self, mu: float) -> np.ndarray:
        """α(k) minimising bias + μ·variance per frequency: (B + μ(v − c)) / (B + μ(N + v − 2c)), in [0, 1]."""
        difference = np.maximum(self.noise + self.estimate - 2 * self.covariance, 1e-12)  # var(n − ε) ≥ 0
        alpha = (self.bias + mu * (self.estimate - self.covariance)) / (self.bias + mu * difference)
        return np.clip(alpha, 0.0, 1.0)

    def variance(self, alpha: np.ndarray) -> float:
        """Per-pixel output noise variance, in units of the input's, for weights α(k)."""
        return self._mean(
            alpha**2 * self.noise + (1 - alpha) ** 2 * self.estimate + 2 * alpha * (1 - alpha) * self.covariance
        )

    def bias_power(self, alpha: np.ndarray) -> float:
        """Per-pixel output bias power (squared), in units of the input's noise variance."""
        return self._mean((1 - alpha) ** 2 * self.bias)

    def weights_for_variance(self, target: float, iterations: int = 80) -> np.ndarray:
        """The least-bias α(k) whose output variance is `target` (bisection on μ, in log scale).

        α moves from 1 (the input: no bias, its variance) at μ → 0 to the least-variance mix at
        μ → ∞; the variance falls monotonically along the way. A target below the least variance
        cannot be reached by any blend: the least-variance weights are returned.
        """
        low, high = np.log(_MU_RANGE[0]), np.log(_MU_RANGE[1])
        if self.variance(self.weights(np.exp(high))) >= target:
            return self.weights(np.exp(high))
        for _ in range(iterations):
            middle = (low + high) / 2
            if self.variance(self.weights(np.exp(middle))) > target:
                low = middle
            else:
                high = middle
        return self.weights(np.exp(high))


@dataclass(frozen=True)
class FrequencyBlocks:
    """A partition of an image's fft2 frequencies into about 64 × 64 rectangular blocks."""

    row_starts: np.ndarray
    col_starts: np.ndarray
    shape: tuple[int, int]

    @classmethod
    def of(cls, shape: tuple[int, ...]) -> FrequencyBlocks:
        rows, cols = int(shape[0]), int(shape[1])
        size = [max(1, int(np.ceil(n / _BLOCKS_PER_AXIS))) for n in (rows, cols)]
        return cls(np.arange(0, rows, size[0]), np.arange(0, cols, size[1]), (rows, cols))

    def _sizes(self) -> tuple[np.ndarray, np.ndarray]:
        return np.diff(np.r_[self.row_starts, self.shape[0]]), np.diff(np.r_[self.col_starts, self.shape[1]])

    @property
    def counts(self) -> np.ndarray:
        rows, cols = self._sizes()
        return np.outer(rows, cols).astype(np.float64)

    def average(self, values: np.ndarray) -> np.ndarray:
        sums = np.add.reduceat(np.add.reduceat(values, self.row_starts, axis=0), self.col_starts, axis=1)
        return sums / self.counts

    def expand(self, values: np.ndarray) -> np.ndarray:
        rows, cols = self._sizes()
        return np.repeat(np.repeat(values, rows, axis=0), cols, axis=1)


def _smoothed_cross_spectrum(a: np.ndarray, b: np.ndarray, weight: float) -> np.ndarray:
    """Re(conj(â)·b̂)/weight, smoothed over neighbouring frequencies (periodic)."""
    spectrum = np.real(np.conj(np.fft.fft2(a)) * np.fft.fft2(b)) / weight
    sigma = [max(_SMOOTHING_MIN_BINS, n * _SPECTRAL_SMOOTHING) for n in spectrum.shape]
    return ndimage.gaussian_filter(spectrum, sigma, mode="wrap")


def spectral_statistics(
    probes: list[tuple[np.ndarray, np.ndarray]], residual: np.ndarray, mask: np.ndarray, blocks: FrequencyBlocks
) -> SpectralStatistics:
    """Spectra of the input's noise, the estimate's noise and the bias, measured in `mask`.

    From `probe_responses` pairs (b ~ the noise, r ≈ Hb): N ≈ |b̂|², c ≈ Re(b̂*r̂), v ≈ |r̂|²;
    `residual` is the normalised residual (its noise is n − ε), so its power minus N + v − 2c is
    what the estimate removed besides noise: B. Each periodogram is taken of the masked array and
    normalised per masked pixel, smoothed over frequency (σ 1/16 of each axis) and averaged over
    the `blocks`.
    """
    weight = float(np.count_nonzero(mask))
    inside = mask.astype(np.float64)

    def spectrum(pairs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        return blocks.average(
            np.mean([_smoothed_cross_spectrum(a * inside, b * inside, weight) for a, b in pairs], axis=0)
        )

    noise = spectrum([(b, b) for b, _ in probes])
    estimate = spectrum([(r, r) for _, r in probes])
    covariance = spectrum(probes)
    residual_power = spectrum([(residual, residual)])
    floor = 1e-3 * float(np.mean(noise))
    bias = np.maximum(residual_power - (noise + estimate - 2 * covariance), floor)
    return SpectralStatistics(noise, estimate, covariance, bias, blocks.counts)


@dataclass(frozen=True)
class SpectralBlend:
    image: np.ndarray  # raw, target dose, offset kept
    predicted_noise_ratio: float  # predicted output noise / full-dose noise in the breast (1: reached)
    low_dose_weight: float  # noise-weighted mean α(k)/r: the input's weight, comparable with the blends' ω₁
    estimate_variance: float  # mean v(k): the estimate's noise variance relative to the input's


def spectral_blend(
    z: np.ndarray,
    estimate_raw: np.ndarray,
    noise: NoiseModel,
    dose_fraction: float,
    probes: list[tuple[np.ndarray, np.ndarray]],
    mask: np.ndarray,
) -> SpectralBlend:
    """(D − τ)/r + τ + (σ_low/r)·A(u): the estimate plus the filtered normalised residual.

    u = (z − D)/σ_low(D) is the residual in units of the input's noise std (its noise n − ε is
    stationary there); A filters it with the weights α(k) = `SpectralStatistics.weights_for_variance`
    of the statistics measured in the breast (`spectral_statistics`, from `probe_responses`),
    so the output is Σ_k α(k)·input + (1 − α(k))·estimate, frequency by frequency, with the mean
    kept exactly. The target variance, in these units, is T = r²·v_full/v_low (r when σ_e = 0);
    it depends on the signal through σ_e, so the weights are solved for a few levels of T spanning
    the breast and each pixel takes the output for its own T (linear interpolation).
    """
    r = dose_fraction
    z = np.asarray(z, dtype=np.float64)
    estimate_raw = np.asarray(estimate_raw, dtype=np.float64)
    signal = np.maximum(estimate_raw - noise.offset, 0.0)
    low_std = np.sqrt(noise.variance(signal))
    target = r**2 * noise.variance(signal / r) / low_std**2
    residual = (z - estimate_raw) / low_std
    blocks = FrequencyBlocks.of(residual.shape)
    statistics = spectral_statistics(probes, residual, mask, blocks)
    spectrum = np.fft.fft2(residual)

    inside = target[mask] if mask.any() else target.ravel()
    levels = np.unique(np.quantile(inside, np.linspace(0.01, 0.99, _TARGET_LEVELS)))
    if levels[-1] - levels[0] < 0.01 * levels[-1]:
        levels = levels[-1:]
    filtered = np.zeros_like(z)
    predicted_variance = alpha_mean = 0.0
    for index, level in enumerate(levels):
        alpha = statistics.weights_for_variance(float(level))
        share = _hat(target, levels, index)
        filtered += share * np.real(np.fft.ifft2(blocks.expand(alpha) * spectrum))
        fraction = float(np.mean(share[mask])) if mask.any() else 1.0 / len(levels)
        predicted_variance += fraction * statistics.variance(alpha) / float(level)
        alpha_mean += fraction * float(
            np.sum(alpha * statistics.noise * blocks.counts) / np.sum(statistics.noise * blocks.counts)
        )
    image = (estimate_raw - noise.offset) / r + noise.offset + (low_std / r) * filtered
    return SpectralBlend(
        image=image,
        predicted_noise_ratio=float(np.sqrt(predicted_variance)),
        low_dose_weight=alpha_mean / r,
        estimate_variance=statistics.variance(np.zeros_like(statistics.estimate)),
    )


def _hat(values: np.ndarray, levels: np.ndarray, index: int) -> np.ndarray:
    """Piecewise-linear interpolation weights of `levels[index]` at `values` (clamped at the ends)."""
    if len(levels) == 1:
        return np.ones_like(values)
    unit = np.zeros(len(levels))
    unit[index] = 1.0
    return np.interp(values, levels, unit)
