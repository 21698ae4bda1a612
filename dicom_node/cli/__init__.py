"""Every `dicom-node` command: parse, call, print. The work happens in the modules they call.

A user error (bad file, bad config, bad flag) ends as one line on stderr and a non-zero exit;
set DICOM_NODE_DEBUG=1 to see the traceback of an unexpected failure.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer


from dicom_node import __version__
from dicom_node.config import ConfigError, load_config
from dicom_node.console import parse_size, run_app

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
    from dicom_node.pipeline.processing import ProcessingError

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
    model: Annotated[
        Optional[str], typer.Option(help="deep: model name in the model directory (default: the one for this dose).")
    ] = None,
    blend: Annotated[
        Optional[str], typer.Option(help="gat-bm3d blend: plain (smallest bias) or noise-aware (full-dose noise level).")
    ] = None,
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with timings and QC.")] = False,
) -> None:
    """Restore one raw mammogram file offline and write the derived DICOM."""
    from dicom_node.imaging import read_mammogram, save_dataset
    from dicom_node.pipeline.processing import NoiseOverrides, restore_mammogram, restorer_options

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
        model_name=model,
        options=restorer_options(cfg, pipeline, model=model, blend=blend),
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
        "model": {"name": processed.model_name, "digest": processed.model_digest} if processed.model_name else None,
        "device": processed.device,
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


def _parse_size(size: str) -> tuple[int, int]:
    try:
        return parse_size(size)
    except ValueError as exc:
        raise UserError(str(exc)) from None


@app.command()
def phantom(
    outdir: Annotated[Path, typer.Argument(help="Folder for the DICOM files and the truth (.npy).")],
    seed: Annotated[int, typer.Option(help="Phantom and noise seed (deterministic).")] = 0,
    size: Annotated[str, typer.Option(help="Rows x columns.")] = "1024x832",
    dose: Annotated[
        Optional[list[float]], typer.Option(help="Dose fraction of an acquisition; repeat for several (default 1 and 0.5).")
    ] = None,
    repeats: Annotated[int, typer.Option(help="Acquisitions per dose (or per exposure with --flat-field).")] = 1,
    detector: Annotated[str, typer.Option(help="Detector entry of the configuration whose noise model to simulate.")] = "SIM-0001",
    flat_field: Annotated[bool, typer.Option("--flat-field", help="Write flat-field exposures for `calibrate` instead.")] = False,
    exposure: Annotated[
        Optional[list[float]], typer.Option(help="With --flat-field: exposure in mAs; repeat for several.")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Write synthetic raw MG For Processing files (and their noise-free truth) for demos and tests."""
    from dicom_node.tools.demo import simulated_noise, write_flat_fields, write_phantom_study

    cfg = load_config(config)
    shape = _parse_size(size)
    try:
        noise = simulated_noise(cfg, detector)
        if flat_field:
            paths = write_flat_fields(
                outdir, noise, exposures_mas=exposure or (25.0, 50.0, 100.0, 150.0), repeats=max(repeats, 2),
                shape=shape, seed=seed, detector=detector,
            )
            typer.echo(f"wrote {len(paths)} flat fields to {outdir}")
            return
        manifest = write_phantom_study(
            outdir, noise, seed=seed, shape=shape, doses=dose or (1.0, 0.5), repeats=repeats, detector=detector
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:
        raise UserError(f"cannot write to {outdir}: {exc.strerror or exc}") from None
    count = sum(len(v) for v in manifest["files"].values())
    typer.echo(f"wrote {count} images of phantom seed {seed} and its truth to {outdir}")


@app.command()
def calibrate(
    flat_fields: Annotated[list[Path], typer.Argument(metavar="FLAT.dcm...", help="Raw flat-field images at 2+ exposures.")],
    serial: Annotated[
        Optional[str], typer.Option(help="Detector entry name; default the images' Device Serial Number.")
    ] = None,
    output: Annotated[Optional[Path], typer.Option(help="Write the [detectors.SERIAL] entry here (default stdout).")] = None,
    gain_map: Annotated[
        Optional[Path], typer.Option("--gain-map", help="Also save the per-pixel gain map (.npy) here.")
    ] = None,
) -> None:
    """Fit offset τ, gain λ (and a λ map) and electronic noise σe from flat fields."""
    import tomli_w

    from dicom_node.imaging import read_mammogram
    from dicom_node.restore.calibration import calibrate_flat_fields

    images, exposures, serials = [], [], set()
    for path in flat_fields:
        image = read_mammogram(path)
        if image.params.exposure_mas is None:
            raise UserError(f"{path} has no Exposure (mAs); calibration needs each flat field's exposure")
        images.append(image.pixels.astype(np.float64))
        exposures.append(image.params.exposure_mas)
        serials.add(image.params.detector_serial)
    if serial is None:
        if len(serials) != 1 or None in serials:
            raise UserError(f"the flat fields name detectors {sorted(map(str, serials))}; pass --serial")
        serial = serials.pop()
    try:
        result = calibrate_flat_fields(images, exposures)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    entry: dict = {"gain": round(result.gain, 6), "electronic_noise": round(result.electronic_noise, 4),
                   "offset": round(result.offset, 3)}
    if gain_map is not None and result.gain_map is not None:
        np.save(gain_map, result.gain_map)
        base = output.parent.resolve() if output else Path.cwd()
        try:
            entry["gain_map"] = str(gain_map.resolve().relative_to(base))
        except ValueError:
            entry["gain_map"] = str(gain_map.resolve())
    for exp, mean, var in zip(result.exposures, result.means, result.variances):
        typer.echo(f"{exp:g} mAs: mean {mean:.1f} ADU above offset, noise variance {var:.2f} ADU²", err=True)
    typer.echo(f"fit r²: offset {result.offset_fit_r2:.4f}, variance {result.variance_fit_r2:.4f}"
               + (" (σe² came out negative and was set to 0)" if result.electronic_noise_clamped else ""), err=True)
    text = f"# dicom-node calibrate: {len(images)} flat fields\n" + tomli_w.dumps({"detectors": {serial: entry}})
    if output:
        output.write_text(text)
        typer.echo(f"wrote [detectors.{serial}] to {output}", err=True)
    else:
        typer.echo(text, nl=False)


@app.command()
def demo(
    outdir: Annotated[Path, typer.Argument(help="Folder for the demo's files and report.")] = Path("demo"),
    seed: Annotated[int, typer.Option(help="Phantom and noise seed.")] = 0,
    size: Annotated[str, typer.Option(help="Rows x columns.")] = "768x624",
    dose_fraction: Annotated[float, typer.Option("--dose-fraction", help="Dose of the simulated low-dose images.")] = 0.5,
    realisations: Annotated[int, typer.Option(help="Low-dose acquisitions to restore (≥ 2).")] = 3,
    config: ConfigOption = None,
) -> None:
    """Restore a synthetic half-dose phantom and compare it with full dose and the truth."""
    from dicom_node.tools.demo import format_table, run_demo

    if realisations < 2:
        raise UserError("--realisations must be at least 2 (residual noise needs repeated acquisitions)")
    if not 0 < dose_fraction <= 1:
        raise UserError(f"--dose-fraction must be in (0, 1], got {dose_fraction:g}")
    cfg = load_config(config)
    typer.echo(f"phantom {size}, {realisations} acquisitions at {dose_fraction * 100:g}% dose → {outdir}")
    try:
        rows = run_demo(outdir, cfg, seed=seed, shape=_parse_size(size), dose_fraction=dose_fraction,
                        realisations=realisations, say=typer.echo)
    except OSError as exc:
        raise UserError(f"cannot write to {outdir}: {exc.strerror or exc}") from None
    typer.echo(format_table(rows))
    typer.echo(f"report: {outdir / 'report.md'}")


@app.command()
def serve(config: ConfigOption = None) -> None:
    """Run the node: receiver, workers, forwarder and scheduler, until SIGTERM or Ctrl-C."""
    from dicom_node.node.logs import configure_logging
    from dicom_node.node.service import serve as run_node

    cfg = load_config(config)
    configure_logging()
    run_node(cfg)


@app.command()
def worker(config: ConfigOption = None) -> None:
    """Run one restoration worker alone (e.g. on a GPU host sharing the job log)."""
    import signal
    import threading

    from dicom_node.node.logs import configure_logging
    from dicom_node.pipeline.worker import run_worker

    cfg = load_config(config)
    configure_logging()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    run_worker(cfg, stop)


def _destination(cfg, name: str):
    from dicom_node.forward.destinations import make_destination

    for entry in cfg.destinations:
        if entry.name == name:
            return make_destination(entry, cfg.node.ae_title, base_dir=cfg.base_dir)
    known = ", ".join(d.name for d in cfg.destinations) or "none"
    raise UserError(f"no destination named {name!r} (configured: {known})")


@app.command()
def echo(
    destination: Annotated[str, typer.Argument(metavar="DEST", help="Destination name from the configuration.")],
    config: ConfigOption = None,
) -> None:
    """C-ECHO a destination (or check that a folder destination is writable)."""
    cfg = load_config(config)
    dest = _destination(cfg, destination)
    result = dest.echo()
    if not result.ok:
        raise UserError(result.message)
    typer.echo(f"{dest.describe()}: ok ({result.seconds * 1000:.0f} ms)")


def _job_dict(job) -> dict:
    from dataclasses import asdict, is_dataclass

    data = asdict(job) if is_dataclass(job) else dict(vars(job))
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in data.items() if not k.startswith("_")}


def _parse_since(since: str | None):
    from datetime import datetime, timedelta, timezone

    if since is None:
        return None
    units = {"m": "minutes", "h": "hours", "d": "days"}
    if since[-1:] in units and since[:-1].replace(".", "", 1).isdigit():
        return datetime.now(timezone.utc) - timedelta(**{units[since[-1]]: float(since[:-1])})
    try:
        moment = datetime.fromisoformat(since)
    except ValueError:
        raise UserError(f"--since must be like 30m, 12h, 2d or an ISO date, got {since!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


@app.command()
def jobs(
    status: Annotated[Optional[str], typer.Option(help="Only jobs in this state.")] = None,
    since: Annotated[Optional[str], typer.Option(help="Only jobs received since: 30m, 12h, 2d or an ISO date.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array with every field.")] = False,
    config: ConfigOption = None,
) -> None:
    """List jobs from the job log."""
    from dicom_node.joblog import JobLog, JobStatus

    cfg = load_config(config)
    if status is not None and status not in {s.value for s in JobStatus}:
        raise UserError(f"--status must be one of {', '.join(s.value for s in JobStatus)}, got {status!r}")
    found = JobLog(cfg.database_url).list_jobs(status=status, since=_parse_since(since), limit=limit)
    if as_json:
        json.dump([_job_dict(j) for j in found], sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
        return
    for job in found:
        received = job.received_at.strftime("%Y-%m-%d %H:%M:%S") if job.received_at else "-"
        error = f"  {job.last_error}" if job.last_error and job.status != "done" else ""
        typer.echo(f"{job.id:>6}  {received}  {str(job.status):<10} {job.calling_ae or '-':<16} "
                   f"{job.profile or '-':<12} {job.sop_instance_uid}{error}")
    if not found:
        typer.echo("no jobs", err=True)


def _change_job(config: Path | None, job_id: int, action: str) -> None:
    """Run JobLog.retry or JobLog.cancel; an impossible change is a user error."""
    from dicom_node.joblog import JobLog

    try:
        getattr(JobLog(load_config(config).database_url), action)(job_id)
    except ValueError as exc:
        raise UserError(str(exc)) from None


@app.command()
def retry(
    job_id: Annotated[int, typer.Argument(metavar="JOB", help="Job number (see `jobs`).")],
    config: ConfigOption = None,
) -> None:
    """Queue a failed or cancelled job (or its failed sends) again."""
    _change_job(config, job_id, "retry")
    typer.echo(f"job {job_id} queued again")


@app.command()
def cancel(
    job_id: Annotated[int, typer.Argument(metavar="JOB", help="Job number (see `jobs`).")],
    config: ConfigOption = None,
) -> None:
    """Stop a job: it will not be processed or sent any further."""
    _change_job(config, job_id, "cancel")
    typer.echo(f"job {job_id} cancelled")


@app.command()
def selftest(
    config: ConfigOption = None,
    size: Annotated[str, typer.Option(help="Phantom rows x columns.")] = "512x416",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the restored image.")] = 600,
) -> None:
    """Push a synthetic phantom through the running node to a loopback receiver; time each stage."""
    from dicom_node.tools.selftest import SelftestError, run_selftest

    cfg = load_config(config)
    try:
        report = run_selftest(cfg, size=_parse_size(size), timeout_s=timeout)
    except SelftestError as exc:
        raise UserError(f"selftest failed: {exc}") from None
    typer.echo(f"selftest passed: job {report.job_id}, {report.sop_instance_uid} → {report.derived_sop_instance_uid}")
    for stage, seconds in report.stages_s.items():
        typer.echo(f"  {stage:<8} {seconds:8.2f} s")


@app.command("check-config")
def check_config(
    config: ConfigOption = None,
    no_echo: Annotated[bool, typer.Option("--no-echo", help="Only validate; do not contact the destinations.")] = False,
) -> None:
    """Validate a configuration file and C-ECHO each destination."""
    cfg = load_config(config)
    where = cfg.path or "embedded defaults"
    typer.echo(
        f"{where}: valid — AE {cfg.node.ae_title} on {cfg.node.bind}:{cfg.node.port}, "
        f"{len(cfg.sources)} sources, {len(cfg.destinations)} destinations, "
        f"{len(cfg.profiles)} profiles, {len(cfg.detectors)} detectors"
    )
    if no_echo:
        return
    failed = []
    for entry in cfg.destinations:
        dest = _destination(cfg, entry.name)
        result = dest.echo()
        typer.echo(f"  {entry.name}: " + (f"ok ({dest.describe()})" if result.ok else result.message))
        if not result.ok:
            failed.append(entry.name)
    if failed:
        raise UserError(f"destinations not reachable: {', '.join(failed)}")


@app.command()
def version() -> None:
    """Print the node's version."""
    typer.echo(__version__)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run a command, turning user errors into one line and an exit code."""
    run_app(app, argv, prog="dicom-node", user_errors=_user_errors())
