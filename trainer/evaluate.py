"""Seed 000's phantom evaluation (its Tables 2 and 3) for trained models, MB, FD and LD.

A synthetic phantom is acquired repeatedly: N full-dose realisations make the pseudo ground
truth, P more at full dose and P at the low dose form the FD and LD groups, and every method
restores the same P low-dose realisations. For each group: MNSE = RN + B² by the paper's
protocol (against the pseudo-GT) and exactly (against the known noise-free truth), the mean SNR
inside the breast, and the calcifications' contrast kept relative to the truth. LD is put on
the full-dose scale, (z − τ)/γ, so its figures compare with the others.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dicom_node.restore.mask import breast_mask
from dicom_node.restore.noise import NoiseModel
from dicom_node.restore.registry import Restorer, create_restorer
from dicom_node.sim.acquisition import acquire
from dicom_node.sim.evaluation import NoiseBias, calcification_retention, exact_noise_bias, mean_snr, mnse, snr_map
from dicom_node.sim.phantom import make_phantom

TABLE_MD = "evaluation.md"
TABLE_CSV = "evaluation.csv"
SNR_PNG = "snr_maps.png"


@dataclass
class GroupResult:
    method: str
    protocol: NoiseBias  # against the pseudo-GT of the N full-dose realisations (the paper's)
    exact: NoiseBias  # against the noise-free truth
    mean_snr: float
    calcification_retention: float  # of the group's mean image; 1 = contrast fully kept
    seconds_per_image: float  # restoration time (0 for FD and LD)
    snr_map: np.ndarray


def model_restorer(model: str | Path) -> tuple[str, Restorer]:
    """(label, restorer) for a model given as DIR/NAME (a .json or .safetensors suffix is ignored)."""
    from dicom_node.restore.deep import DeepRestorer

    path = Path(model)
    name = path.name.removesuffix(".json").removesuffix(".safetensors")
    return f"DL {name}", DeepRestorer(model=name, model_dir=path.parent)


def evaluate(
    models: list[str | Path],
    noise: NoiseModel,
    *,
    size: tuple[int, int] = (512, 416),
    seed: int = 1000,
    dose_fraction: float = 0.5,
    realisations: int = 5,
    references: int = 10,
) -> list[GroupResult]:
    """Rows in the paper's order: LD, the models, MB, FD."""
    phantom = make_phantom(size, seed=seed)
    rng = np.random.default_rng([seed, 7])

    def acquisitions(count: int, dose: float) -> np.ndarray:
        return np.stack([acquire(phantom.signal, noise, dose, rng).astype(np.float64) for _ in range(count)])

    reference = acquisitions(references, 1.0) - noise.offset
    full_dose = acquisitions(realisations, 1.0) - noise.offset
    low_dose = acquisitions(realisations, dose_fraction)
    mask = breast_mask(reference.mean(axis=0) + noise.offset, noise) & phantom.mask

    def group(method: str, stack: np.ndarray, seconds: float = 0.0) -> GroupResult:
        retention = calcification_retention(stack.mean(axis=0), phantom.signal, phantom.calcifications, mask)
        return GroupResult(
            method, mnse(stack, reference, mask), exact_noise_bias(stack, phantom.signal, mask),
            mean_snr(stack, mask), retention, seconds, snr_map(stack),
        )

    def restored(restorer: Restorer) -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        images = [restorer.restore(z, noise, dose_fraction).image - noise.offset for z in low_dose]
        return np.stack(images), (time.perf_counter() - started) / len(images)

    rows = [group("LD", (low_dose - noise.offset) / dose_fraction)]
    for model in models:
        label, restorer = model_restorer(model)
        rows.append(group(label, *restored(restorer)))
    rows.append(group("MB (gat-bm3d)", *restored(create_restorer("gat-bm3d"))))
    rows.append(group("FD", full_dose))
    for row in rows:
        row.snr_map = np.where(mask, row.snr_map, np.nan)
    return rows


CSV_FIELDS = (
    "method", "mnse_pct", "rn_pct", "b2_pct", "exact_mnse_pct", "exact_rn_pct", "exact_b2_pct",
    "mean_snr", "calcification_retention", "seconds_per_image",
)


def _record(row: GroupResult) -> dict:
    p, e = row.protocol, row.exact
    return {
        "method": row.method,
        "mnse_pct": 100 * p.mnse, "rn_pct": 100 * p.rn, "b2_pct": 100 * p.b2,
        "exact_mnse_pct": 100 * e.mnse, "exact_rn_pct": 100 * e.rn, "exact_b2_pct": 100 * e.b2,
        "mean_snr": row.mean_snr, "calcification_retention": row.calcification_retention,
        "seconds_per_image": row.seconds_per_image,
    }


def markdown_table(rows: list[GroupResult], settings: str) -> str:
    lines = [
        f"# Phantom evaluation ({settings})",
        "",
        "MNSE = RN + B² in % of the signal: by seed 000's protocol (pseudo ground truth from the",
        "full-dose references) and exactly (against the noise-free truth). The goal is RN near FD's",
        "with the smallest B². Calcification retention: contrast kept relative to the truth (1 = all).",
        "",
        "| Method | MNSE (%) | RN (%) | B² (%) | exact MNSE (%) | exact RN (%) | exact B² (%) | mean SNR | calc. retention | s/image |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        r = _record(row)
        lines.append(
            f"| {r['method']} | {r['mnse_pct']:.2f} | {r['rn_pct']:.2f} | {r['b2_pct']:.3f} | "
            f"{r['exact_mnse_pct']:.2f} | {r['exact_rn_pct']:.2f} | {r['exact_b2_pct']:.3f} | "
            f"{r['mean_snr']:.1f} | {r['calcification_retention']:.3f} | {r['seconds_per_image']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def write_report(rows: list[GroupResult], out_dir: Path, settings: str) -> list[Path]:
    """evaluation.md, evaluation.csv and snr_maps.png in `out_dir`."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / TABLE_MD).write_text(markdown_table(rows, settings))
    with open(out_dir / TABLE_CSV, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(_record(row) for row in rows)

    full_dose_snr = np.nanmedian(rows[-1].snr_map)  # like the paper: a range based on the FD SNR
    figure, axes = plt.subplots(1, len(rows), figsize=(2.6 * len(rows), 3.4), constrained_layout=True)
    for axis, row in zip(np.atleast_1d(axes), rows):
        image = axis.imshow(row.snr_map, cmap="viridis", vmin=0.5 * full_dose_snr, vmax=1.5 * full_dose_snr)
        axis.set_title(f"{row.method}\nmean SNR {row.mean_snr:.1f}", fontsize=8)
        axis.axis("off")
    figure.colorbar(image, ax=axes, shrink=0.8, label="SNR")
    figure.savefig(out_dir / SNR_PNG, dpi=100)
    plt.close(figure)
    return [out_dir / TABLE_MD, out_dir / TABLE_CSV, out_dir / SNR_PNG]
