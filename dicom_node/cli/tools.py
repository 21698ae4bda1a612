"""Offline tools: restore one file, write phantoms, calibrate a detector, run the demonstration."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from dicom_node.cli.common import ConfigOption, load_runnable_config, print_json
from dicom_node.config import load_config
from dicom_node.console import parse_size
from dicom_node.errors import ConfigurationError, InputRefused


def process(
    input_path: Annotated[Path, typer.Argument(metavar="IN.dcm", help="Raw MG For Processing image.")],
    output_path: Annotated[Path, typer.Argument(metavar="OUT.dcm", help="Where to write the derived image.")],
    dose_fraction: Annotated[
        float,
        typer.Option(
            "--dose-fraction", help="Input dose relative to the target dose (0.5: half dose restored to full)."
        ),
    ],
    pipeline: Annotated[str, typer.Option("--pipeline", help="Restorer name.")] = "gat-bm3d",
    gain: Annotated[Optional[float], typer.Option("--gain", help="Quantum gain λ (ADU).")] = None,
    electronic_noise: Annotated[
        Optional[float], typer.Option("--electronic-noise", help="Electronic noise σe, standard deviation in ADU.")
    ] = None,
    offset: Annotated[Optional[float], typer.Option("--offset", help="Detector offset τ (ADU).")] = None,
    model: Annotated[
        Optional[str],
        typer.Option(
            help="Model name in the model directory: deep, the restoring model (default: the one for this dose); "
            "gat-bm3d with --denoiser network, the denoising one (default: the newest)."
        ),
    ] = None,
    denoiser: Annotated[
        Optional[str], typer.Option(help="gat-bm3d denoiser: bm3d (default) or network (a trained GAT-domain one).")
    ] = None,
    blend: Annotated[
        Optional[str],
        typer.Option(help="gat-bm3d blend: spectral (default: full-dose noise, least bias), noise-aware or plain."),
    ] = None,
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with timings and QC.")] = False,
) -> None:
    """Restore one raw mammogram file offline and write the derived DICOM."""
    from dicom_node.imaging import read_mammogram, save_dataset
    from dicom_node.pipeline.processing import NoiseOverrides, Plan, report, restore_mammogram

    started = time.perf_counter()
    if input_path.exists() and output_path.exists() and os.path.samefile(input_path, output_path):
        raise InputRefused(f"{output_path} is the input file {input_path}: give another OUT.dcm (the input is kept)")
    cfg = load_config(config)
    chosen = (("model", model), ("blend", blend), ("denoiser", denoiser))
    options = {key: value for key, value in chosen if value is not None}
    plan = Plan(pipeline, dose_fraction, "offline", options)
    image = read_mammogram(input_path)
    read_s = time.perf_counter() - started
    processed = restore_mammogram(image, cfg, plan, overrides=NoiseOverrides(gain, electronic_noise, offset))
    write_started = time.perf_counter()
    try:
        save_dataset(processed.dataset, output_path)
    except OSError as exc:
        raise ConfigurationError(f"cannot write {output_path}: {exc.strerror or exc}") from None
    timings = {"read": read_s, **processed.timings, "write": time.perf_counter() - write_started}
    timings["total"] = time.perf_counter() - started
    if as_json:
        print_json(
            {"input": str(input_path), "output": str(output_path), **report(processed, plan), "timings_s": timings}
        )
        return
    typer.echo(
        f"wrote {output_path} ({pipeline}, dose fraction {dose_fraction:g}, noise from {processed.noise_source})"
    )
    typer.echo("timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
    typer.echo("qc: " + ", ".join(f"{k} {v:.4g}" for k, v in processed.qc.items()))


def phantom(
    outdir: Annotated[Path, typer.Argument(help="Folder for the DICOM files and the truth (.npy).")],
    seed: Annotated[int, typer.Option(help="Phantom and noise seed (deterministic).")] = 0,
    size: Annotated[str, typer.Option(help="Rows x columns.")] = "1024x832",
    dose: Annotated[
        Optional[list[float]],
        typer.Option(help="Dose fraction of an acquisition; repeat for several (default 1 and 0.5)."),
    ] = None,
    repeats: Annotated[int, typer.Option(help="Acquisitions per dose (or per exposure with --flat-field).")] = 1,
    detector: Annotated[
        str, typer.Option(help="Detector entry of the configuration whose noise model to simulate.")
    ] = "SIM-0001",
    flat_field: Annotated[
        bool, typer.Option("--flat-field", help="Write flat-field exposures for `calibrate` instead.")
    ] = False,
    exposure: Annotated[
        Optional[list[float]], typer.Option(help="With --flat-field: exposure in mAs; repeat for several.")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Write synthetic raw MG For Processing files (and their noise-free truth) for demos and tests."""
    from dicom_node.detectors import detector_noise
    from dicom_node.tools.demo import write_flat_fields, write_phantom_study

    cfg = load_config(config)
    shape = parse_size(size)
    noise = detector_noise(cfg, detector)
    try:
        if flat_field:
            paths = write_flat_fields(
                outdir,
                noise,
                exposures_mas=exposure or (25.0, 50.0, 100.0, 150.0),
                repeats=max(repeats, 2),
                shape=shape,
                seed=seed,
                detector=detector,
            )
            typer.echo(f"wrote {len(paths)} flat fields to {outdir}")
            return
        manifest = write_phantom_study(
            outdir, noise, seed=seed, shape=shape, doses=dose or (1.0, 0.5), repeats=repeats, detector=detector
        )
    except OSError as exc:
        raise ConfigurationError(f"cannot write to {outdir}: {exc.strerror or exc}") from None
    count = sum(len(v) for v in manifest["files"].values())
    typer.echo(f"wrote {count} images of phantom seed {seed} and its truth to {outdir}")


def calibrate(
    flat_fields: Annotated[
        list[Path], typer.Argument(metavar="FLAT.dcm...", help="Raw flat-field images at 2+ exposures.")
    ],
    serial: Annotated[
        Optional[str], typer.Option(help="Detector entry name; default the images' Device Serial Number.")
    ] = None,
    output: Annotated[
        Optional[Path], typer.Option(help="Write the [detectors.SERIAL] entry here (default stdout).")
    ] = None,
    gain_map: Annotated[
        Optional[Path], typer.Option("--gain-map", help="Also save the per-pixel gain map (.npy) here.")
    ] = None,
    noise_kernel: Annotated[
        Optional[Path],
        typer.Option(
            "--noise-kernel", help="Save the noise correlation kernel (.npy) here if the noise is correlated."
        ),
    ] = None,
) -> None:
    """Fit offset τ, gain λ (and a λ map), electronic noise σe and the noise correlation from flat fields."""
    from dicom_node.files import write_atomically
    from dicom_node.tools.calibration import calibrate_files, save_gain_map, save_noise_kernel

    calibration = calibrate_files(flat_fields, serial)
    map_entry = save_gain_map(calibration, gain_map, output) if gain_map is not None else None
    kernel_entry = save_noise_kernel(calibration, noise_kernel, output) if noise_kernel is not None else None
    result = calibration.result
    for exp, mean, var in zip(result.exposures, result.means, result.variances, strict=True):
        typer.echo(f"{exp:g} mAs: mean {mean:.1f} ADU above offset, noise variance {var:.2f} ADU²", err=True)
    typer.echo(
        f"fit r²: offset {result.offset_fit_r2:.4f}, variance {result.variance_fit_r2:.4f}"
        + (" (σe² came out negative and was set to 0)" if result.electronic_noise_clamped else ""),
        err=True,
    )
    typer.echo(calibration.correlation_summary(), err=True)
    if kernel_entry is not None:
        typer.echo(f"noise kernel stored in {noise_kernel}", err=True)
    elif result.noise_kernel is not None:
        typer.echo("noise kernel not stored: pass --noise-kernel FILE.npy to make it part of the entry", err=True)
    else:
        typer.echo(
            "no noise kernel stored (white noise)" + (f"; {noise_kernel} not written" if noise_kernel else ""), err=True
        )
    text = calibration.toml(map_entry, kernel_entry)
    if output:
        write_atomically(output, text.encode(), mode=0o644)
        typer.echo(f"wrote [detectors.{calibration.serial}] to {output}", err=True)
    else:
        typer.echo(text, nl=False)


def demo(
    outdir: Annotated[Path, typer.Argument(help="Folder for the demo's files and report.")] = Path("demo"),
    seed: Annotated[int, typer.Option(help="Phantom and noise seed.")] = 0,
    size: Annotated[str, typer.Option(help="Rows x columns.")] = "768x624",
    dose_fraction: Annotated[
        float, typer.Option("--dose-fraction", help="Dose of the simulated low-dose images.")
    ] = 0.5,
    realisations: Annotated[int, typer.Option(help="Low-dose acquisitions to restore (≥ 2).")] = 3,
    config: ConfigOption = None,
) -> None:
    """Restore a synthetic half-dose phantom and compare it with full dose and the truth."""
    from dicom_node.sim.evaluation import markdown_table
    from dicom_node.tools.demo import run_demo

    if realisations < 2:
        raise typer.BadParameter(
            "must be at least 2 (residual noise needs repeated acquisitions)", param_hint="--realisations"
        )
    if not 0 < dose_fraction <= 1:
        raise typer.BadParameter(f"must be in (0, 1], got {dose_fraction:g}", param_hint="--dose-fraction")
    cfg = load_runnable_config(config)
    typer.echo(f"phantom {size}, {realisations} acquisitions at {dose_fraction * 100:g}% dose → {outdir}")
    try:
        rows = run_demo(
            outdir,
            cfg,
            seed=seed,
            shape=parse_size(size),
            dose_fraction=dose_fraction,
            realisations=realisations,
            say=typer.echo,
        )
    except OSError as exc:
        raise ConfigurationError(f"cannot write to {outdir}: {exc.strerror or exc}") from None
    typer.echo(markdown_table(rows), nl=False)
    typer.echo(f"report: {outdir / 'report.md'}")
