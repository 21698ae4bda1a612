"""Every `dicom-node` command: parse, call, print. The work happens in the modules they call.

A user error (bad file, bad config, bad flag) ends as one line on stderr and a non-zero exit;
set DICOM_NODE_DEBUG=1 to see the traceback of an unexpected failure.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from typer._click.exceptions import ClickException, NoArgsIsHelpError  # typer vendors click (pinned range)

from dicom_node import __version__
from dicom_node.config import ConfigError, load_config

app = typer.Typer(
    name="dicom-node",
    help="Restores low-dose raw mammograms between the modality and PACS.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

ConfigOption = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", help="Configuration file (TOML); default $DICOM_NODE_CONFIG, else the embedded defaults."),
]


class UserError(Exception):
    """A problem the person running the command can fix; printed as one line."""


def _user_errors() -> tuple[type[Exception], ...]:
    from dicom_node.imaging import ImagingError
    from dicom_node.processing import ProcessingError

    return (UserError, ConfigError, ImagingError, ProcessingError)


def _print_json(obj: dict) -> None:
    json.dump(obj, sys.stdout, indent=2, default=float)
    sys.stdout.write("\n")


@app.command()
def process(
    input_path: Annotated[Path, typer.Argument(metavar="IN.dcm", help="Raw MG For Processing image.")],
    output_path: Annotated[Path, typer.Argument(metavar="OUT.dcm", help="Where to write the derived image.")],
    dose_fraction: Annotated[
        float, typer.Option("--dose-fraction", help="Input dose relative to the target dose (0.5: half dose restored to full).")
    ],
    pipeline: Annotated[str, typer.Option("--pipeline", help="Restorer name.")] = "gat-bm3d",
    gain: Annotated[Optional[float], typer.Option("--gain", help="Quantum gain λ (ADU).")] = None,
    electronic_noise: Annotated[
        Optional[float], typer.Option("--electronic-noise", help="Electronic noise σe, standard deviation in ADU.")
    ] = None,
    offset: Annotated[Optional[float], typer.Option("--offset", help="Detector offset τ (ADU).")] = None,
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with timings and QC.")] = False,
) -> None:
    """Restore one raw mammogram file offline and write the derived DICOM."""
    from dicom_node.imaging import read_mammogram, save_dataset
    from dicom_node.processing import NoiseOverrides, restore_mammogram

    started = time.perf_counter()
    cfg = load_config(config)
    image = read_mammogram(input_path)
    read_s = time.perf_counter() - started
    processed = restore_mammogram(
        image,
        cfg,
        pipeline=pipeline,
        dose_fraction=dose_fraction,
        profile="offline",
        overrides=NoiseOverrides(gain, electronic_noise, offset),
    )
    write_started = time.perf_counter()
    try:
        save_dataset(processed.dataset, output_path)
    except OSError as exc:
        raise UserError(f"cannot write {output_path}: {exc.strerror or exc}") from None
    timings = {"read": read_s, **processed.timings, "write": time.perf_counter() - write_started}
    timings["total"] = time.perf_counter() - started
    noise = processed.noise
    report = {
        "input": str(input_path),
        "output": str(output_path),
        "pipeline": pipeline,
        "dose_fraction": dose_fraction,
        "noise": {
            "source": processed.noise_source,
            "gain": noise.gain if isinstance(noise.gain, float) else "map",
            "electronic_noise": noise.electronic_noise,
            "offset": noise.offset,
        },
        "sop_instance_uid": str(processed.dataset.SOPInstanceUID),
        "timings_s": timings,
        "qc": processed.qc,
    }
    if as_json:
        _print_json(report)
    else:
        typer.echo(f"wrote {output_path} ({pipeline}, dose fraction {dose_fraction:g}, noise from {processed.noise_source})")
        typer.echo("timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
        typer.echo("qc: " + ", ".join(f"{k} {v:.4g}" for k, v in processed.qc.items()))


@app.command("check-config")
def check_config(config: ConfigOption = None) -> None:
    """Validate a configuration file and summarise what it sets up."""
    cfg = load_config(config)
    where = cfg.path or "embedded defaults"
    typer.echo(
        f"{where}: valid — AE {cfg.node.ae_title} on {cfg.node.bind}:{cfg.node.port}, "
        f"{len(cfg.sources)} sources, {len(cfg.destinations)} destinations, "
        f"{len(cfg.profiles)} profiles, {len(cfg.detectors)} detectors"
    )


@app.command()
def version() -> None:
    """Print the node's version."""
    typer.echo(__version__)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run a command, turning user errors into one line and an exit code."""
    try:
        code = app(args=argv, prog_name="dicom-node", standalone_mode=False)
    except NoArgsIsHelpError as exc:
        typer.echo(exc.ctx.get_help() if exc.ctx else "", err=True)
        sys.exit(2)
    except ClickException as exc:  # usage errors: one line, like every other user error
        print(f"dicom-node: error: {exc.format_message()}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    except _user_errors() as exc:
        print(f"dicom-node: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
        if os.environ.get("DICOM_NODE_DEBUG"):
            raise
        print(
            f"dicom-node: internal error: {type(exc).__name__}: {exc} (set DICOM_NODE_DEBUG=1 for details)",
            file=sys.stderr,
        )
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
