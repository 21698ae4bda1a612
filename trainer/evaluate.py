"""Seed 000's phantom evaluation (its Tables 2 and 3) for trained models, MB, FD and LD.

A synthetic phantom is acquired repeatedly: N full-dose realisations make the pseudo ground
truth, P more at full dose and P at the low dose form the FD and LD groups, and every method
restores the same P low-dose realisations. For each group: MNSE = RN + B² by the paper's
protocol (against the pseudo-GT) and exactly (against the known noise-free truth), the mean SNR
inside the breast, and the calcifications' contrast kept relative to the truth. LD is put on
the full-dose scale, (z − τ)/γ, so its figures compare with the others. The phantom is made at
0.07 mm, the clinical pitch the models are meant for and train on by default, unless told otherwise;
its noise is correlated by the detector's own kernel (`noise.kernel`, white when it has none).
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import numpy as np

from dicom_node.files import write_atomically
from dicom_node.restore.mask import breast_mask
from dicom_node.restore.noise import NoiseModel
from dicom_node.restore.registry import Environment, Restorer, create_restorer
from dicom_node.sim.acquisition import acquire
from dicom_node.sim.evaluation import RECORD_FIELDS, GroupFigures, evaluate_group, figures_record
from dicom_node.sim.evaluation import markdown_table as figures_table
from dicom_node.sim.phantom import make_phantom
from trainer.data import CLINICAL_PIXEL_SPACING_MM

TABLE_MD = "evaluation.md"
TABLE_CSV = "evaluation.csv"
SNR_PNG = "snr_maps.png"
REPORT_MODE = 0o644


def model_restorer(model: str | Path) -> tuple[str, Restorer]:
    """(label, restorer) for a model given as DIR/NAME (a .json or .safetensors suffix is ignored)."""
    path = Path(model)
    name = path.name.removesuffix(".json").removesuffix(".safetensors")
    return f"DL {name}", create_restorer("deep", Environment(model_dir=path.parent), model=name)


def evaluate(
    models: list[str | Path],
    noise: NoiseModel,
    *,
    size: tuple[int, int] = (512, 416),
    seed: int = 1000,
    dose_fraction: float = 0.5,
    realisations: int = 5,
    references: int = 10,
    pixel_spacing_mm: float = CLINICAL_PIXEL_SPACING_MM,
) -> list[GroupFigures]:
    """Rows in the paper's order: LD, the models, MB, FD (SNR maps NaN outside the breast)."""
    phantom = make_phantom(size, seed=seed, pixel_spacing_mm=pixel_spacing_mm)
    rng = np.random.default_rng([seed, 7])

    def acquisitions(count: int, dose: float) -> np.ndarray:
        return np.stack([acquire(phantom.signal, noise, dose, rng).astype(np.float64) for _ in range(count)])

    reference = acquisitions(references, 1.0) - noise.offset
    full_dose = acquisitions(realisations, 1.0) - noise.offset
    low_dose = acquisitions(realisations, dose_fraction)
    mask = breast_mask(reference.mean(axis=0) + noise.offset, noise) & phantom.mask

    def group(method: str, stack: np.ndarray, seconds: float = 0.0) -> GroupFigures:
        return evaluate_group(method, stack, reference, phantom.signal, phantom.calcifications, mask, seconds)

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
    return rows


def markdown_table(rows: list[GroupFigures], settings: str) -> str:
    """evaluation.md: a title naming the settings, what the figures mean, and the table."""
    lines = [
        f"# Phantom evaluation ({settings})",
        "",
        "MNSE = RN + B² in % of the signal: by seed 000's protocol (pseudo ground truth from the",
        "full-dose references) and exactly (against the noise-free truth). The goal is RN near FD's",
        "with the smallest B². Calcification retention: contrast kept relative to the truth (1 = all).",
        "",
    ]
    return "\n".join(lines) + "\n" + figures_table(rows)


def write_report(rows: list[GroupFigures], out_dir: Path, settings: str) -> list[Path]:
    """evaluation.md, evaluation.csv and snr_maps.png in `out_dir`."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(out_dir / TABLE_MD, markdown_table(rows, settings).encode(), mode=REPORT_MODE)
    write_atomically(out_dir / TABLE_CSV, _csv_text(rows).encode(), mode=REPORT_MODE)

    maps = [row.snr_map for row in rows if row.snr_map is not None]
    if len(maps) != len(rows):
        raise ValueError("write_report needs every row's SNR map (as evaluate_group makes them)")
    full_dose_snr = np.nanmedian(maps[-1])  # like the paper: a range based on the FD SNR
    figure, axes = plt.subplots(1, len(rows), figsize=(2.6 * len(rows), 3.4), constrained_layout=True)
    for axis, row, snr in zip(np.atleast_1d(axes), rows, maps, strict=True):
        image = axis.imshow(snr, cmap="viridis", vmin=0.5 * full_dose_snr, vmax=1.5 * full_dose_snr)
        axis.set_title(f"{row.method}\nmean SNR {row.mean_snr:.1f}", fontsize=8)
        axis.axis("off")
    figure.colorbar(image, ax=axes, shrink=0.8, label="SNR")
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=100)
    plt.close(figure)
    write_atomically(out_dir / SNR_PNG, png.getvalue(), mode=REPORT_MODE)
    return [out_dir / TABLE_MD, out_dir / TABLE_CSV, out_dir / SNR_PNG]


def _csv_text(rows: list[GroupFigures]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=RECORD_FIELDS)
    writer.writeheader()
    writer.writerows(figures_record(row) for row in rows)
    return text.getvalue()
