"""The seed paper's evaluation protocol (Shan, Vimieiro et al., section 3.3) and exact versions.

Every function takes offset-free signals (raw − τ): the figures normalise by the ground truth, so
an offset left in would shrink them. Stacks are [realisation, row, column]; `mask` is the breast.

MNSE = RN + B²: residual noise (variance over realisations) plus squared bias, both relative to
the signal. The goal of restoration is RN at the full-dose level with the smallest B², not the
lowest MNSE (over-smoothing trades noise for bias).

`evaluate_group` gives all the figures of one group of realisations (`GroupFigures`), and
`figures_record` / `markdown_table` are the one CSV/JSON record and the one table of them, used
by `dicom-node demo` and `python -m trainer evaluate` alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

SNR_WINDOW = 15


@dataclass(frozen=True)
class NoiseBias:
    """MNSE, RN and B² as fractions of the signal (multiply by 100 for the paper's %)."""

    mnse: float
    rn: float
    b2: float

    def __str__(self) -> str:
        return f"MNSE {100 * self.mnse:.2f} % (RN {100 * self.rn:.2f} % + B² {100 * self.b2:.2f} %)"


def _check(stack: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> np.ndarray:
    stack = np.asarray(stack, dtype=np.float64)
    if stack.ndim != 3 or stack.shape[0] < 2:
        raise ValueError("need a stack of at least 2 realisations, shaped [realisation, row, column]")
    if stack.shape[1:] != reference.shape or mask.shape != reference.shape:
        raise ValueError("realisations, reference and mask must have the same image shape")
    if not np.all(reference[mask] > 0):
        raise ValueError("the reference must be positive inside the mask (did you subtract the offset twice?)")
    return stack


def pseudo_ground_truth(full_dose: np.ndarray) -> np.ndarray:
    """The mean of N full-dose realisations (the paper uses N = 10)."""
    return np.asarray(full_dose, dtype=np.float64).mean(axis=0)


def _mean_corrected(stack: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Each realisation mapped onto the GT by a first-order fit, so B² measures blur, not mean shifts."""
    corrected = np.empty_like(stack)
    for p, image in enumerate(stack):
        slope, intercept = np.polyfit(gt[mask], image[mask], 1)
        corrected[p] = (image - intercept) / slope
    return corrected


def mnse(realisations: np.ndarray, full_dose_reference: np.ndarray, mask: np.ndarray) -> NoiseBias:
    """MNSE, RN and B² of P realisations against the pseudo-GT of N full-dose realisations.

    As in the paper, the N reference realisations are first mean-corrected to their own mean and
    the GT recomputed; then each evaluated realisation is mean-corrected to that GT.
    φ₁ = mean_I(V(X*)/GT)/N removes the GT's own noise (V from the N reference realisations).
    """
    reference = np.asarray(full_dose_reference, dtype=np.float64)
    first = pseudo_ground_truth(reference)
    _check(reference, first, mask)
    reference = _mean_corrected(reference, first, mask)
    gt = pseudo_ground_truth(reference)
    stack = _mean_corrected(_check(realisations, gt, mask), gt, mask)
    n, p = reference.shape[0], stack.shape[0]
    phi1 = np.mean(reference.var(axis=0, ddof=1)[mask] / gt[mask]) / n
    total = np.mean(((stack - gt) ** 2)[:, mask] / gt[mask]) - phi1
    rn = np.mean(stack.var(axis=0, ddof=1)[mask] / gt[mask])
    b2 = np.mean((stack.mean(axis=0) - gt)[mask] ** 2 / gt[mask]) - phi1 - rn / p
    return NoiseBias(float(total), float(rn), float(b2))


def exact_noise_bias(realisations: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> NoiseBias:
    """RN and B² against the known noise-free truth (synthetic phantoms only); MNSE = RN + B²."""
    truth = np.asarray(truth, dtype=np.float64)
    stack = _check(realisations, truth, mask)
    p = stack.shape[0]
    rn = np.mean(stack.var(axis=0, ddof=1)[mask] / truth[mask])
    b2 = np.mean((stack.mean(axis=0) - truth)[mask] ** 2 / truth[mask]) - rn / p
    return NoiseBias(float(rn + b2), float(rn), float(b2))


def snr_map(realisations: np.ndarray, window: int = SNR_WINDOW) -> np.ndarray:
    """Mean over realisations / std over realisations, each smoothed by a window×window box."""
    stack = np.asarray(realisations, dtype=np.float64)
    mean = ndimage.uniform_filter(stack.mean(axis=0), window)
    std = ndimage.uniform_filter(stack.std(axis=0, ddof=1), window)
    return mean / np.maximum(std, np.finfo(float).tiny)


def mean_snr(realisations: np.ndarray, mask: np.ndarray, window: int = SNR_WINDOW) -> float:
    return float(np.mean(snr_map(realisations, window)[mask]))


def calcification_retention(
    image: np.ndarray, truth: np.ndarray, calcifications: np.ndarray, mask: np.ndarray
) -> float:
    """Contrast of the calcifications against their surround in `image`, over the same in `truth`.

    Contrast = mean of a 2–5 px ring around the calcifications minus their mean (they attenuate,
    so they are darker in raw data). 1: fully kept; below 1: blurred away; NaN: no calcifications.
    """
    calcs = calcifications & mask
    if not calcs.any():
        return float("nan")
    ring = ndimage.binary_dilation(calcs, iterations=5) & ~ndimage.binary_dilation(calcs, iterations=2) & mask

    def contrast(img: np.ndarray) -> float:
        return float(np.mean(img[ring]) - np.mean(img[calcs]))

    reference = contrast(np.asarray(truth, dtype=np.float64))
    if reference <= 0:
        raise ValueError("the calcifications are not darker than their surround in the truth")
    return contrast(np.asarray(image, dtype=np.float64)) / reference


@dataclass
class GroupFigures:
    """All the figures of one group of realisations (one method, or FD / LD): a table row."""

    method: str  # the method or group, e.g. "LD", "DL hresnet-phantom-50", "MB (gat-bm3d)", "FD"
    protocol: NoiseBias  # against the pseudo-GT of the N full-dose realisations (the paper's)
    exact: NoiseBias  # against the noise-free truth
    mean_snr: float  # inside the mask
    calcification_retention: float  # of the group's mean image; 1 = contrast fully kept
    seconds_per_image: float = 0.0  # restoration time (0 for FD and LD)
    snr_map: np.ndarray | None = field(default=None, repr=False, compare=False)  # NaN outside the mask


def evaluate_group(
    name: str,
    stack: np.ndarray,
    reference: np.ndarray,
    truth: np.ndarray,
    calcifications: np.ndarray,
    mask: np.ndarray,
    seconds: float = 0.0,
) -> GroupFigures:
    """The figures of `stack` (P realisations, offset-free) against the N full-dose `reference`
    realisations (the protocol) and the noise-free `truth` (exact), inside `mask`."""
    stack = np.asarray(stack, dtype=np.float64)
    snr = snr_map(stack)
    return GroupFigures(
        method=name,
        protocol=mnse(stack, reference, mask),
        exact=exact_noise_bias(stack, truth, mask),
        mean_snr=float(np.mean(snr[mask])),
        calcification_retention=calcification_retention(stack.mean(axis=0), truth, calcifications, mask),
        seconds_per_image=seconds,
        snr_map=np.where(mask, snr, np.nan),
    )


RECORD_FIELDS = (
    "method",
    "mnse_pct",
    "rn_pct",
    "b2_pct",
    "exact_mnse_pct",
    "exact_rn_pct",
    "exact_b2_pct",
    "mean_snr",
    "calcification_retention",
    "seconds_per_image",
)


def figures_record(row: GroupFigures) -> dict[str, str | float]:
    """One row as a flat record (`RECORD_FIELDS`; MNSE, RN and B² in %), for CSV and JSON."""
    p, e = row.protocol, row.exact
    return {
        "method": row.method,
        "mnse_pct": 100 * p.mnse,
        "rn_pct": 100 * p.rn,
        "b2_pct": 100 * p.b2,
        "exact_mnse_pct": 100 * e.mnse,
        "exact_rn_pct": 100 * e.rn,
        "exact_b2_pct": 100 * e.b2,
        "mean_snr": row.mean_snr,
        "calcification_retention": row.calcification_retention,
        "seconds_per_image": row.seconds_per_image,
    }


def markdown_table(rows: list[GroupFigures]) -> str:
    """The rows as a Markdown table (percentages of the signal, as in the seed paper)."""
    lines = [
        "| Method | MNSE (%) | RN (%) | B² (%) | exact MNSE (%) | exact RN (%) | exact B² (%) | mean SNR | calc. retention | s/image |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        r = figures_record(row)
        lines.append(
            f"| {r['method']} | {r['mnse_pct']:.2f} | {r['rn_pct']:.2f} | {r['b2_pct']:.3f} | "
            f"{r['exact_mnse_pct']:.2f} | {r['exact_rn_pct']:.2f} | {r['exact_b2_pct']:.3f} | "
            f"{r['mean_snr']:.1f} | {r['calcification_retention']:.3f} | {r['seconds_per_image']:.2f} |"
        )
    return "\n".join(lines) + "\n"
