"""`python -m trainer train | export | evaluate`: parse, call, print; the work is in the modules.

A user error (any `NodeError`: a bad experiment file, a missing checkpoint, an unknown model, an
unusable training image) ends as one line on stderr and a non-zero exit; set DICOM_NODE_DEBUG=1
to see the traceback of an unexpected failure.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from dicom_node.console import make_app, parse_size, run_app
from dicom_node.errors import ConfigurationError

app = make_app("trainer", "Trains, exports and evaluates the deep restoration networks.")


@app.command()
def train(
    ctx: typer.Context,
    config: Annotated[Path, typer.Option("--config", "-c", metavar="EXPERIMENT.toml", help="The experiment file.")],
    set_: Annotated[
        Optional[list[str]],
        typer.Option(
            "--set", metavar="KEY=VALUE", help="Override a setting, e.g. --set training.epochs=5 (TOML value)."
        ),
    ] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Override training.epochs.")] = None,
    device: Annotated[Optional[str], typer.Option(help="Override training.device: auto, cpu or cuda.")] = None,
    out: Annotated[
        Optional[Path], typer.Option(help="Folder for the checkpoint and curves (default runs/NAME).")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the checkpoint in --out.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar or per-epoch lines.")] = False,
) -> None:
    """Train a network as an experiment file describes (a checkpoint every epoch)."""
    from trainer.experiment import load_experiment
    from trainer.train import train as run_training

    overrides = list(set_ or [])
    overrides += [f"training.epochs={epochs}"] if epochs is not None else []
    overrides += [f'training.device="{device}"'] if device is not None else []
    experiment = load_experiment(config, overrides)
    out_dir = out or Path("runs") / experiment.name
    result = run_training(experiment, out_dir, resume=resume, command=ctx.obj, progress=not quiet)
    last = result.history[-1]
    typer.echo(
        f"wrote {result.checkpoint} (epoch {last['epoch']}: validation loss {last['val_loss']:.5g}, "
        f"PSNR {last['val_psnr']:.2f} dB, SSIM {last['val_ssim']:.4f})"
    )


@app.command()
def export(
    ctx: typer.Context,
    checkpoint: Annotated[
        Path, typer.Argument(metavar="CHECKPOINT", help="checkpoint.pt, or the run folder holding it.")
    ],
    name: Annotated[str, typer.Option(help="Model name: writes NAME.safetensors and NAME.json.")],
    out: Annotated[Path, typer.Option(help="Model directory to write into.")],
) -> None:
    """Write a checkpoint's weights (safetensors) and model card (JSON) for the node."""
    from trainer.export import export_model
    from trainer.train import CHECKPOINT

    if checkpoint.is_dir():
        checkpoint = checkpoint / CHECKPOINT
    card = export_model(checkpoint, name, out, command=ctx.obj)
    typer.echo(f"wrote {card.with_suffix('.safetensors')} and {card}")


@app.command()
def evaluate(
    models: Annotated[
        Optional[list[Path]],
        typer.Option("--models", metavar="DIR/NAME", help="A model to evaluate; repeat for several."),
    ] = None,
    size: Annotated[str, typer.Option(help="Phantom rows x columns.")] = "512x416",
    realisations: Annotated[int, typer.Option(help="P: realisations per evaluated group.")] = 5,
    references: Annotated[int, typer.Option(help="N: full-dose realisations behind the pseudo ground truth.")] = 10,
    seed: Annotated[int, typer.Option(help="Phantom and noise seed (keep it apart from the training seeds).")] = 1000,
    dose: Annotated[float, typer.Option(help="Dose fraction of the low-dose acquisitions.")] = 0.5,
    pixel_spacing: Annotated[
        float,
        typer.Option(
            "--pixel-spacing",
            metavar="MM",
            help="Phantom pitch in mm (default 0.07, the clinical pitch the models are meant for and train on).",
        ),
    ] = 0.07,
    detector: Annotated[str, typer.Option(help="Detector entry of the node configuration to simulate.")] = "SIM-0001",
    config: Annotated[
        Optional[Path], typer.Option("--config", "-c", help="Node configuration (default: embedded).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder for evaluation.md, evaluation.csv and snr_maps.png.")] = Path(
        "evaluation"
    ),
) -> None:
    """Seed 000's Table 2/3 on repeated phantom acquisitions: the models, MB, FD and LD."""
    from dicom_node.config import load_config
    from dicom_node.detectors import detector_noise
    from trainer.evaluate import evaluate as run_evaluation
    from trainer.evaluate import markdown_table, write_report

    shape = parse_size(size, minimum=128)
    if realisations < 2 or references < 2:
        raise ConfigurationError("--realisations and --references must be at least 2")
    if not 0 < dose < 1:
        raise ConfigurationError(f"--dose must be in (0, 1), got {dose}")
    if not 0 < pixel_spacing < 10:
        raise ConfigurationError(f"--pixel-spacing must be a pitch in mm in (0, 10), got {pixel_spacing:g}")
    node_config = load_config(config)
    try:
        noise = detector_noise(node_config, detector)
    except ConfigurationError as exc:
        raise ConfigurationError(f"--detector: {exc}") from None
    rows = run_evaluation(  # an unknown model, or one for another dose, is a ConfigurationError
        list(models or []),
        noise,
        size=shape,
        seed=seed,
        dose_fraction=dose,
        realisations=realisations,
        references=references,
        pixel_spacing_mm=pixel_spacing,
    )
    settings = f"phantom {shape[0]}x{shape[1]} at {pixel_spacing:g} mm, seed {seed}, dose {dose:g}, N = {references}, P = {realisations}, detector {detector}"
    paths = write_report(rows, out, settings)
    typer.echo(markdown_table(rows, settings))
    typer.echo("wrote " + ", ".join(str(p) for p in paths))


def main(argv: list[str] | None = None) -> None:
    """Entry point: run a command, turning user errors into one line and an exit code."""
    argv = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "-m", "trainer", *argv])  # the model card's "reproduce"
    run_app(app, argv, prog="python -m trainer", obj=command)  # a NodeError ends as one line
