"""Synthetic studies for demonstrations, calibration drills and tests.

`write_phantom_study` and `write_flat_fields` turn the simulator's arrays into raw MG DICOM files
a modality could have sent; `run_demo` pushes a half-dose phantom study through the same code as
`dicom-node process` and measures the result against the known truth, the way QA would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from dicom_node.config import Config
from dicom_node.console import strict_json
from dicom_node.detectors import detector_noise
from dicom_node.errors import InputRefused
from dicom_node.files import write_atomically
from dicom_node.imaging import raw_mammogram_dataset, read_mammogram, save_dataset
from dicom_node.pipeline.processing import Plan, restore_mammogram
from dicom_node.restore.noise import NoiseModel
from dicom_node.sim.acquisition import acquire
from dicom_node.sim.evaluation import GroupFigures, evaluate_group, figures_record, markdown_table
from dicom_node.sim.phantom import flat_field, make_phantom

FULL_DOSE_MAS = 100.0  # tube load of the simulated full-dose exposure; scales with the dose fraction
FLAT_FIELD_ADU_PER_MAS = 80.0  # open-field signal per mAs of the simulated detector
SIMULATED_DETECTOR = "SIM-0001"


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


def write_phantom_study(
    outdir: Path,
    noise: NoiseModel,
    *,
    seed: int = 0,
    shape: tuple[int, int] = (1024, 832),
    doses: Sequence[float] = (1.0, 0.5),
    repeats: int = 1,
    detector: str = SIMULATED_DETECTOR,
) -> dict:
    """Write `repeats` acquisitions of one phantom at each dose fraction, plus its truth (.npy).

    Returns the manifest (also written as phantom.json): files per dose and the noise model.
    """
    if repeats < 1:
        raise InputRefused("repeats must be at least 1")
    for dose in doses:
        if not 0 < dose <= 1:
            raise InputRefused(f"dose fractions must be in (0, 1], got {dose:g}")
    outdir.mkdir(parents=True, exist_ok=True)
    phantom = make_phantom(shape, seed=seed)
    stem = f"seed{seed}"
    for name, array in (("truth", phantom.signal), ("mask", phantom.mask), ("calcifications", phantom.calcifications)):
        _save_array(outdir / f"{name}-{stem}.npy", array)
    files: dict[str, list[str]] = {}
    for dose in doses:
        for k in range(repeats):
            pixels = acquire(phantom.signal, noise, dose_fraction=dose, rng_or_seed=_rng(seed, round(dose * 1e6), k))
            ds = raw_mammogram_dataset(
                pixels,
                seed=seed,
                detector_serial=detector,
                exposure_mas=FULL_DOSE_MAS * dose,
                pixel_spacing_mm=phantom.pixel_spacing_mm,
                dose_label=f"{dose * 100:g}% dose",
                laterality="L" if seed % 2 == 0 else "R",
            )
            name = f"mg-{stem}-dose{dose:.2f}-{k + 1:02d}.dcm"
            save_dataset(ds, outdir / name)
            files.setdefault(f"{dose:g}", []).append(name)
    manifest = {
        "seed": seed,
        "shape": list(shape),
        "detector": detector,
        "noise": {"gain": _scalar(noise.gain), "electronic_noise": noise.electronic_noise, "offset": noise.offset},
        "truth": f"truth-{stem}.npy (noise-free signal at full dose, ADU above the offset)",
        "mask": f"mask-{stem}.npy",
        "calcifications": f"calcifications-{stem}.npy",
        "files": files,
    }
    write_atomically(outdir / "phantom.json", (strict_json(manifest) + "\n").encode(), mode=0o644)
    return manifest


def write_flat_fields(
    outdir: Path,
    noise: NoiseModel,
    *,
    exposures_mas: Sequence[float] = (25.0, 50.0, 100.0, 150.0),
    repeats: int = 2,
    shape: tuple[int, int] = (512, 416),
    seed: int = 0,
    detector: str = SIMULATED_DETECTOR,
) -> list[Path]:
    """Flat-field exposures (no breast) for `dicom-node calibrate`, `repeats` at each exposure."""
    outdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, mas in enumerate(exposures_mas):
        signal = flat_field(shape, FLAT_FIELD_ADU_PER_MAS * mas, seed=seed)
        for k in range(repeats):
            pixels = acquire(signal, noise, dose_fraction=1.0, rng_or_seed=_rng(seed, 1000 + index, k))
            ds = raw_mammogram_dataset(
                pixels,
                seed=seed,
                detector_serial=detector,
                exposure_mas=mas,
                flat_field=True,
                dose_label=f"{mas:g} mAs",
            )
            path = outdir / f"flat-{mas:g}mAs-{k + 1:02d}.dcm"
            save_dataset(ds, path)
            paths.append(path)
    return paths


def run_demo(
    outdir: Path,
    config: Config,
    *,
    seed: int = 0,
    shape: tuple[int, int] = (768, 624),
    dose_fraction: float = 0.5,
    realisations: int = 3,
    pipeline: str = "gat-bm3d",
    say: Callable[[str], None] = print,
) -> list[GroupFigures]:
    """Phantom → `realisations` low-dose acquisitions → restored → RN, B², SNR and calcification retention.

    The low-dose files go through `read_mammogram` and `restore_mammogram`, exactly like
    `dicom-node process`; the restored files are written next to them for viewing.
    """
    noise = detector_noise(config, SIMULATED_DETECTOR)  # taken from the configuration like a real one's
    phantom = make_phantom(shape, seed=seed)
    (outdir / "input").mkdir(parents=True, exist_ok=True)
    (outdir / "restored").mkdir(parents=True, exist_ok=True)
    _save_array(outdir / "truth.npy", phantom.signal)

    full = np.stack(
        [acquire(phantom.signal, noise, 1.0, rng_or_seed=_rng(seed, 1, k)) for k in range(10 + realisations)]
    )
    low, restored, seconds = [], [], []
    for k in range(realisations):
        pixels = acquire(phantom.signal, noise, dose_fraction, rng_or_seed=_rng(seed, 2, k))
        ds = raw_mammogram_dataset(
            pixels,
            seed=seed,
            detector_serial=SIMULATED_DETECTOR,
            exposure_mas=FULL_DOSE_MAS * dose_fraction,
            dose_label=f"{dose_fraction * 100:g}% dose realisation {k + 1}",
        )
        in_path = outdir / "input" / f"low-dose-{k + 1:02d}.dcm"
        save_dataset(ds, in_path)
        processed = restore_mammogram(read_mammogram(in_path), config, Plan(pipeline, dose_fraction, "demo"))
        out_path = outdir / "restored" / f"restored-{k + 1:02d}.dcm"
        save_dataset(processed.dataset, out_path)
        restore_s = processed.timings.get("total", 0.0)
        say(f"restored {in_path.name} → {out_path.name} in {restore_s:.1f} s")
        seconds.append(restore_s)
        low.append(pixels)
        restored.append(read_mammogram(out_path).pixels)

    offset = noise.offset
    groups = [  # (name, offset-free stack, restoration seconds per image)
        ("FD (full dose)", full[10:].astype(np.float64) - offset, 0.0),
        (
            f"LD ({dose_fraction * 100:g}% dose, rescaled)",
            (np.stack(low).astype(np.float64) - offset) / dose_fraction,
            0.0,
        ),
        (f"restored ({pipeline})", np.stack(restored).astype(np.float64) - offset, float(np.mean(seconds))),
    ]
    reference = full[:10].astype(np.float64) - offset
    rows = [
        evaluate_group(name, stack, reference, phantom.signal, phantom.calcifications, phantom.mask, seconds_per_image)
        for name, stack, seconds_per_image in groups
    ]
    _write_report(outdir, rows, dose_fraction, realisations)
    return rows


def _write_report(outdir: Path, rows: list[GroupFigures], dose_fraction: float, realisations: int) -> None:
    records = [figures_record(r) for r in rows]
    write_atomically(outdir / "report.json", (strict_json(records) + "\n").encode(), mode=0o644)
    text = (
        f"# Restoration of a synthetic phantom from {dose_fraction * 100:g}% dose\n\n"
        f"{realisations} realisations per group; pseudo ground truth from 10 full-dose realisations "
        "(seed 000 protocol: MNSE = RN + B², in % of the signal); 'exact' figures use the noise-free truth.\n"
        "The goal is the full-dose RN with the smallest B², not the lowest MNSE.\n\n"
        f"{markdown_table(rows)}"
    )
    write_atomically(outdir / "report.md", text.encode(), mode=0o644)


def _scalar(gain: float | np.ndarray) -> float | str:
    return float(gain) if np.ndim(gain) == 0 else "map"


def _save_array(path: Path, array: np.ndarray) -> None:
    write_atomically(path, lambda stream: np.save(stream, array), mode=0o644)
