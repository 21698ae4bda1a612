"""Phantom QA, for the QA physicist: evaluate a folder of phantom images offline (`qa-phantom`),
and list the sessions the node evaluated, per detector over time (`qa-sessions`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from dicom_node.cli.common import ConfigOption, load_runnable_config, print_json
from dicom_node.errors import ConfigurationError, InputRefused, NodeError


def qa_phantom(
    folder: Annotated[Path, typer.Argument(help="Folder of raw phantom images (searched recursively).")],
    profile: Annotated[
        Optional[str],
        typer.Option(help="Profile whose restorer restores the reduced doses (default: the configuration's first)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with every figure.")] = False,
    config: ConfigOption = None,
) -> None:
    """Evaluate phantom images taken at full and reduced exposures with the seed paper's protocol.

    The highest exposure (mAs) is the full-dose reference (at least 2 images); each lower one is a
    reduced dose (at least 2 images each), restored and compared with the plain rescaled input:
    RN, B² and MNSE against the full-dose mean, and mean SNR, per detector.
    """
    from dicom_node.imaging import MammoImage, read_mammogram
    from dicom_node.qa.phantom import evaluate_session

    cfg = load_runnable_config(config)
    if profile is None:
        if not cfg.profiles:
            raise ConfigurationError("the configuration has no profiles: add one or pass --profile")
        profile = next(iter(cfg.profiles))
    elif profile not in cfg.profiles:
        raise ConfigurationError(
            f"unknown profile {profile!r}; the configuration has {', '.join(sorted(cfg.profiles)) or 'none'}"
        )
    if not folder.is_dir():
        raise InputRefused(f"{folder} is not a folder")
    images: dict[str, list[MammoImage]] = {}
    skipped: list[str] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            image = read_mammogram(path, label=str(path.relative_to(folder)))
        except InputRefused as exc:
            skipped.append(str(exc))
            continue
        if not image.params.for_processing:
            skipped.append(f"{path.relative_to(folder)} is For Presentation, not raw")
            continue
        images.setdefault(image.params.detector_serial or "unknown detector", []).append(image)
    if skipped:
        typer.echo(f"skipped {len(skipped)} files that are not raw mammograms (first: {skipped[0]})", err=True)
    if not images:
        raise InputRefused(f"{folder} holds no raw (For Processing) mammograms")
    sessions = []
    for detector, found in sorted(images.items()):
        try:
            sessions.append(evaluate_session(found, cfg, profile))
        except NodeError as exc:
            if len(images) == 1:
                raise
            raise type(exc)(f"detector {detector}: {exc}") from None
    if as_json:
        print_json({"folder": str(folder), "skipped_files": len(skipped), "sessions": sessions})
        return
    for result in sessions:
        print_session(result, typer.echo)


def qa_sessions(
    detector: Annotated[Optional[str], typer.Option(help="Only this detector's sessions.")] = None,
    rule: Annotated[Optional[str], typer.Option(help="Only this phantom QA rule's sessions.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many, the newest.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array, oldest session first.")] = False,
    config: ConfigOption = None,
) -> None:
    """List the phantom QA sessions the node recorded, oldest first: per dose the restored and
    rescaled figures, so a detector's trend over time reads down the table."""
    from dicom_node.cli.jobs import open_joblog
    from dicom_node.qa.phantom import trend

    rows = trend(open_joblog(config, quiet=as_json), detector, rule, limit)
    if as_json:
        print_json(rows)
        return
    if not rows:
        typer.echo("no phantom QA sessions", err=True)
        return
    typer.echo(
        f"{'SESSION':>7}  {'FIRST IMAGE (UTC)':<19}  {'DETECTOR':<14} {'RULE':<12} {'STATUS':<10} {'IMAGES':>6}  "
        f"{'DOSE':>5}  {'RN %':>6} {'B² %':>6} {'MNSE %':>7}  {'RESCALED MNSE %':>15}  {'FD RN %':>7}"
    )
    for row in rows:
        head = (
            f"{row['id']:>7}  {row['first_image_at'].strftime('%Y-%m-%d %H:%M:%S'):<19}  "
            f"{row['detector'] or '-':<14} {row['rule']:<12} {row['status']:<10}"
        )
        full = row["full_dose"] or {}
        if not row["doses"]:
            images = full.get("images")
            typer.echo(f"{head} {images if images is not None else '-':>6}  {row['error'] or ''}")
            continue
        for dose in row["doses"]:
            restored = dose["restored"] or {}
            typer.echo(
                f"{head} {dose['images']:>6}  {_pct(dose['dose_fraction'], 0):>5}  {_pct(restored.get('rn')):>6} "
                f"{_pct(restored.get('b2')):>6} {_pct(restored.get('mnse')):>7}  "
                f"{_pct(dose['rescaled']['mnse']):>15}  {_pct(full.get('rn')):>7}"
                + (f"  {dose['error']}" if dose.get("error") else "")
            )


def print_session(result: dict[str, Any], say: Callable[[str], None]) -> None:
    """One evaluated session as a readable table (figures in % of the signal, as in the seed paper)."""
    options = " ".join(f"{k}={v}" for k, v in sorted(result["options"].items()))
    model = f", model {result['model']['name']}" if result["model"] else ""
    kvp = f", {result['kvp']:g} kV" if result["kvp"] is not None else ""
    say(
        f"detector {result['detector'] or 'unknown'}{kvp}: profile {result['profile']} "
        f"({result['pipeline']} {options}{model}), {result['mask_pixels']} px in the phantom mask"
    )
    say(f"{'GROUP':<10} {'DOSE':>5} {'mAs':>8} {'IMAGES':>6}  {'RN %':>6} {'B² %':>6} {'MNSE %':>7} {'SNR':>7}")
    full = result["full_dose"]
    say(
        f"{'full dose':<10} {'100%':>5} {full['exposure_mas']:>8.3g} {full['images']:>6}  "
        f"{_pct(full['rn']):>6} {'-':>6} {'-':>7} {_num(full['snr']):>7}"
    )
    for dose in result["doses"]:
        for group in ("restored", "rescaled"):
            figures = dose[group]
            if figures is None:
                say(f"{group:<10} {_pct(dose['dose_fraction'], 0):>5}  not restored: {dose.get('error', '')}")
                continue
            say(
                f"{group:<10} {_pct(dose['dose_fraction'], 0):>5} {dose['exposure_mas']:>8.3g} {dose['images']:>6}  "
                f"{_pct(figures['rn']):>6} {_pct(figures['b2']):>6} {_pct(figures['mnse']):>7} "
                f"{_num(figures['snr']):>7}"
            )
    for dose in result["doses"]:
        ratio = dose["restored_vs_full_dose_mnse"]
        if ratio is not None:
            say(
                f"restored at {_pct(dose['dose_fraction'], 0)} dose: MNSE {ratio:.2f} × the full-dose RN "
                f"(RN {dose['restored_vs_full_dose_rn']:.2f} ×; the aim is RN ≈ 1 × with the least B²)"
            )
    for skip in result["skipped"]:
        say(f"skipped {skip['exposure_mas']:g} mAs: {skip['reason']}")


def _pct(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}" + ("%" if digits == 0 else "")


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
