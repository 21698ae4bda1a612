"""Running the node, for radiology IT: serve, a worker alone, checks and the selftest."""

from __future__ import annotations

import signal
import threading
from typing import Annotated

import typer

from dicom_node.cli.common import ConfigOption, load_runnable_config
from dicom_node.console import parse_size
from dicom_node.errors import ConfigurationError, Unavailable


def serve(config: ConfigOption = None) -> None:
    """Run the node: receiver, workers, forwarder and scheduler, until SIGTERM or Ctrl-C."""
    from dicom_node.checks import check_listen
    from dicom_node.node.logs import configure_logging
    from dicom_node.node.service import serve as run_node

    cfg = load_runnable_config(config)
    check_listen(cfg.node.bind, cfg.node.port)  # a port in use is one line, not a traceback from the bind
    configure_logging()
    run_node(cfg)


def worker(config: ConfigOption = None) -> None:
    """Run one restoration worker alone (e.g. on a GPU host sharing the job log)."""
    from dicom_node.node.logs import configure_logging
    from dicom_node.pipeline.worker import run_worker

    cfg = load_runnable_config(config)
    configure_logging()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    run_worker(cfg, stop)


def echo(
    destination: Annotated[str, typer.Argument(metavar="DEST", help="Destination name from the configuration.")],
    config: ConfigOption = None,
) -> None:
    """C-ECHO a destination (or check that a folder destination is writable)."""
    from dicom_node.config import load_config
    from dicom_node.forward.destinations import destination_named

    dest = destination_named(load_config(config), destination)
    result = dest.echo()
    if not result.ok:
        raise Unavailable(result.message)
    typer.echo(f"{dest.describe()}: ok ({result.seconds * 1000:.0f} ms)")


def selftest(
    config: ConfigOption = None,
    size: Annotated[str, typer.Option(help="Phantom rows x columns.")] = "512x416",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the restored image.")] = 600,
) -> None:
    """Push a synthetic phantom through the running node to a loopback receiver; time each stage."""
    from dicom_node.config import load_config
    from dicom_node.tools.selftest import run_selftest

    report = run_selftest(load_config(config), size=parse_size(size), timeout_s=timeout)
    typer.echo(f"selftest passed: job {report.job_id}, {report.sop_instance_uid} → {report.derived_sop_instance_uid}")
    for stage, seconds in report.stages_s.items():
        typer.echo(f"  {stage:<8} " + ("       - (not recorded)" if seconds is None else f"{seconds:8.2f} s"))


def check_config(
    config: ConfigOption = None,
    no_echo: Annotated[bool, typer.Option("--no-echo", help="Only validate; do not contact the destinations.")] = False,
) -> None:
    """Validate a configuration and what it names on this machine (models, folders, ports, calibration
    files), say which job log it uses, then C-ECHO each destination (a folder destination's folder is
    created, as the node would)."""
    from dicom_node.checks import check_configuration
    from dicom_node.cli.jobs import describe_database
    from dicom_node.config import load_config
    from dicom_node.forward.destinations import destination_named

    cfg = load_config(config)
    where = cfg.path or "embedded defaults"
    typer.echo(
        f"{where}: AE {cfg.node.ae_title} on {cfg.node.bind}:{cfg.node.port}, "
        f"{len(cfg.sources)} sources, {len(cfg.destinations)} destinations, "
        f"{len(cfg.profiles)} profiles, {len(cfg.detectors)} detectors"
    )
    typer.echo(f"  job log: {describe_database(cfg.database_url)}")
    problems = check_configuration(cfg)
    for problem in problems:
        typer.echo(f"{'warning' if problem.warning else 'error'}: {problem.text}", err=True)
    failed = [problem for problem in problems if not problem.warning]
    if failed:
        raise ConfigurationError(f"{where}: not valid ({len(failed)} problem{'s' if len(failed) > 1 else ''} above)")
    typer.echo(f"{where}: valid")
    if no_echo:
        return
    unreachable = []
    for entry in cfg.destinations:
        dest = destination_named(cfg, entry.name)
        result = dest.echo()
        typer.echo(f"  {entry.name}: " + (f"ok ({dest.describe()})" if result.ok else result.message))
        if not result.ok:
            unreachable.append(entry.name)
    if unreachable:
        raise Unavailable(f"destinations not reachable: {', '.join(unreachable)}")
