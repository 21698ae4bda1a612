"""Robustness study: LD, FD, MB (gat-bm3d) and deep models over a grid of phantoms and detectors.

A grid over phantoms (seeds disjoint from training, 5000 and up by default) × detectors (λ, σ_e, τ)
× crosstalk (3×3 CsI-like quantum-noise correlation, `crosstalk_kernel`) × dose × λ
miscalibration (the restorer is given λ·(1 + error) while the data were acquired with λ). Each
(phantom, detector, crosstalk, dose) is one independent, seeded unit of work: N full-dose
references (the pseudo ground truth of seed 000's protocol), P full-dose realisations (FD), P
low-dose ones (LD, rescaled (z − τ)/γ), and every method restores the same P low-dose frames
once per miscalibration. Figures (`dicom_node.sim.evaluation.evaluate_group`): RN and MNSE
relative to FD's (protocol), B² by the protocol and exactly (against the noise-free truth, %),
and the calcifications' contrast kept.

MB variants: gat-bm3d with each blend asked for (by default its default, spectral, and plain). With crosstalk the detector's
GAT-domain kernel κ is measured as a calibration would (pairs of simulated flat fields at the
breast's low-dose level, `measured_gat_kernel`) and given to the restorer (BM3D told the noise
spectrum: "MB <blend>"); "MB <blend>, white" is the same restorer assuming white noise.

The "goal" column checks the issue's goals on every restored row: at 50 % dose RN/FD within
0.95–1.05, at 25 % RN/FD ≤ 1.10, under λ miscalibration RN/FD within 0.90–1.15, and the
calcification contrast kept ≥ 0.95 ("miss" says by how much).

Example: .venv/bin/python bench/robustness.py --size 256x208 --detectors hologic,noisy \\
    --crosstalk 0,0.5 --doses 0.5,0.25 --jobs 2 --out /tmp/robustness-run
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import multiprocessing
import os
import platform
import sys
import time
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dicom_node.restore.calibration import calibrate_flat_fields
from dicom_node.restore.deep.card import TASKS
from dicom_node.restore.deep.store import default_model_dir, read_card, resolve_model
from dicom_node.restore.gat_bm3d import BLEND_MODES, GatBm3dOptions
from dicom_node.restore.mask import breast_mask
from dicom_node.restore.noise import NoiseModel
from dicom_node.restore.registry import Environment, Restorer, create_restorer
from dicom_node.sim.acquisition import acquire
from dicom_node.sim.evaluation import GroupFigures, evaluate_group
from dicom_node.sim.phantom import flat_field, make_phantom

TABLE_MD = "robustness.md"
TABLE_CSV = "robustness.csv"

# Named detectors: (λ, σ_e, τ) in ADU. λ 0.05–0.2, σ_e 2–5, τ 30–100.
PRESETS: dict[str, tuple[float, float, float]] = {
    "hologic": (0.1, 3.0, 50.0),  # a-Se, Hologic Selenia Dimensions-like
    "low-gain": (0.05, 2.0, 30.0),  # fewer ADU per quantum: electronic noise matters more
    "noisy": (0.2, 5.0, 100.0),  # high gain, noisy electronics, high offset
    "mid": (0.15, 4.0, 75.0),
}
BLENDS = BLEND_MODES
DEFAULT_BLEND = GatBm3dOptions().blend

# The goals (RN relative to FD's, by the protocol).
GOAL_HALF_DOSE = (0.95, 1.05)
GOAL_QUARTER_DOSE_MAX = 1.10
GOAL_MISCALIBRATED = (0.90, 1.15)
GOAL_CALCIFICATION = 0.95

FIGURES = (  # the numeric figures of each row
    "rn_over_fd",
    "exact_rn_over_fd",
    "mnse_over_fd",
    "rn_pct",
    "b2_pct",
    "exact_b2_pct",
    "calcification_retention",
    "seconds_per_image",
)
FIELDS = (
    "phantom_seed",
    "detector",
    "gain",
    "electronic_noise",
    "offset",
    "crosstalk",
    "dose",
    "gain_error",
    "method",
    *FIGURES,
    "goal",
)


@dataclass(frozen=True)
class Detector:
    name: str
    gain: float  # λ
    electronic_noise: float  # σ_e
    offset: float  # τ

    def model(self, gain_error: float = 0.0, kernel: np.ndarray | None = None) -> NoiseModel:
        return NoiseModel(self.gain * (1.0 + gain_error), self.electronic_noise, self.offset, kernel)


@dataclass(frozen=True)
class Unit:
    """One independent piece of work: its frames are drawn from a seed made of its own key."""

    phantom_seed: int
    detector: Detector
    crosstalk: float
    dose: float
    gain_errors: tuple[float, ...]
    blends: tuple[str, ...]
    white: bool  # with crosstalk, also run each blend assuming white noise
    models: tuple[str, ...]
    denoisers: tuple[str, ...]  # DIR/NAME of GAT-domain denoising networks, in BM3D's place
    size: tuple[int, int]
    pixel_spacing_mm: float
    realisations: int
    references: int

    def seed(self) -> list[int]:
        key = f"{self.detector.name}:{self.detector.gain}:{self.detector.electronic_noise}:{self.detector.offset}"
        return [self.phantom_seed, zlib.crc32(key.encode()), round(1000 * self.crosstalk), round(1000 * self.dose)]


@dataclass
class Row:
    unit: Unit
    gain_error: float | None  # None for LD and FD (acquired data: no restorer, no calibration)
    figures: GroupFigures
    fd: GroupFigures
    goal: str = ""
    record: dict[str, str | float] = field(default_factory=dict)


def parse_size(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be ROWSxCOLS, e.g. 256x208, got {text!r}") from None
    if rows < 64 or cols < 64:
        raise argparse.ArgumentTypeError("size must be at least 64x64")
    return rows, cols


def parse_floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def parse_detectors(text: str) -> tuple[Detector, ...]:
    """Comma-separated presets (`PRESETS`) or custom detectors λ:σe:τ (optionally NAME=λ:σe:τ)."""
    detectors = []
    for item in (v.strip() for v in text.split(",")):
        if not item:
            continue
        if item in PRESETS:
            detectors.append(Detector(item, *PRESETS[item]))
            continue
        name, _, spec = item.rpartition("=")
        try:
            gain, sigma, offset = (float(v) for v in spec.split(":"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"unknown detector {item!r}: use a preset ({', '.join(PRESETS)}) or λ:σe:τ, e.g. 0.1:3:50"
            ) from None
        detectors.append(Detector(name or f"λ{gain:g} σe{sigma:g} τ{offset:g}", gain, sigma, offset))
    if not detectors:
        raise argparse.ArgumentTypeError("no detector given")
    return tuple(detectors)


def parse_blends(text: str) -> tuple[str, ...]:
    """Comma-separated gat-bm3d blends with BM3D; "none" scores no BM3D variant (e.g. only --denoisers)."""
    if text.strip() == "none":
        return ()
    blends = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [b for b in blends if b not in BLENDS]
    if unknown or not blends:
        raise argparse.ArgumentTypeError(f"blends must be among {', '.join(BLENDS)} (or none), got {text!r}")
    return blends


def measured_gat_kernel(
    detector: Detector, crosstalk: float, level: float, rng: np.random.Generator
) -> np.ndarray | None:
    """The GAT-domain noise kernel κ of the simulated detector, measured as a site would: flat fields
    acquired with the same crosstalk around the breast's low-dose `level` (two exposures, two
    repeats each) given to `calibrate_flat_fields`. Electronic noise and rounding dilute the
    crosstalk's correlation, so κ is not the crosstalk kernel."""
    exposures = [0.8, 0.8, 1.25, 1.25]  # around the level (the correlation depends on it)
    images = [
        acquire(flat_field((256, 256), level * e), detector.model(), 1.0, rng, crosstalk=crosstalk) for e in exposures
    ]
    return calibrate_flat_fields(images, exposures).noise_kernel


def _restorers(unit: Unit) -> list[tuple[str, Restorer, bool]]:
    """(label, restorer, told the spectrum) for every restored method of the unit."""
    methods: list[tuple[str, Restorer, bool]] = []
    for blend in unit.blends:
        restorer = create_restorer("gat-bm3d", blend=blend)
        methods.append((f"MB {blend}", restorer, unit.crosstalk > 0))
        if unit.crosstalk > 0 and unit.white:
            methods.append((f"MB {blend}, white", restorer, False))
    for entry in unit.denoisers:
        model_dir, name, blend, conditioned = denoiser_entry(entry)
        network = create_restorer(
            "gat-bm3d", Environment(model_dir=model_dir), denoiser="network", model=name, blend=blend
        )
        # a conditioned network is told the noise's correlation; one trained for white noise runs as told
        # white noise where there is crosstalk
        white = ", white" if unit.crosstalk > 0 and not conditioned else ""
        methods.append((f"MB {blend} + {name}{white}", network, conditioned and unit.crosstalk > 0))
    for model in unit.models:
        path = Path(model)
        name = path.name.removesuffix(".json").removesuffix(".safetensors")
        deep = create_restorer("deep", Environment(model_dir=path.parent), model=name)
        methods.append((f"DL {name}", deep, unit.crosstalk > 0))
    return methods


def denoiser_entry(entry: str) -> tuple[Path, str, str, bool]:
    """(model directory, name, blend, conditioned) of a --denoisers entry DIR/NAME[:BLEND]. Without
    a blend: plain for a model trained through it (loss "protocol"), else gat-bm3d's default."""
    model, _, blend = entry.partition(":")
    path = Path(model)
    name = path.name.removesuffix(".json").removesuffix(".safetensors")
    card = read_card(path.parent, name)
    if blend and blend not in BLEND_MODES:
        raise SystemExit(f"--denoisers {entry}: unknown blend {blend!r}; known: {', '.join(BLEND_MODES)}")
    blend = blend or ("plain" if card.loss == "protocol" else DEFAULT_BLEND)
    return path.parent, name, blend, bool(card.network_options.get("conditions"))


def run_unit(unit: Unit) -> list[Row]:
    """LD and FD once, then every method at every miscalibration, on the same frames."""
    phantom = make_phantom(unit.size, seed=unit.phantom_seed, pixel_spacing_mm=unit.pixel_spacing_mm)
    rng = np.random.default_rng(unit.seed())
    truth_noise = unit.detector.model()
    tau = truth_noise.offset

    def acquisitions(count: int, dose: float) -> np.ndarray:
        frames = [acquire(phantom.signal, truth_noise, dose, rng, crosstalk=unit.crosstalk) for _ in range(count)]
        return np.stack(frames).astype(np.float64)

    reference = acquisitions(unit.references, 1.0) - tau
    full_dose = acquisitions(unit.realisations, 1.0) - tau
    low_dose = acquisitions(unit.realisations, unit.dose)
    mask = breast_mask(reference.mean(axis=0) + tau, truth_noise) & phantom.mask
    kernel = None
    if unit.crosstalk > 0:
        level = float(np.median(unit.dose * phantom.signal[phantom.mask]))
        kernel = measured_gat_kernel(unit.detector, unit.crosstalk, level, rng)

    def group(method: str, stack: np.ndarray, seconds: float = 0.0) -> GroupFigures:
        figures = evaluate_group(method, stack, reference, phantom.signal, phantom.calcifications, mask, seconds)
        figures.snr_map = None  # not reported; keeps what crosses process boundaries small
        return figures

    fd = group("FD", full_dose)
    rows = [Row(unit, None, group("LD", (low_dose - tau) / unit.dose), fd), Row(unit, None, fd, fd)]
    for gain_error in unit.gain_errors:
        for label, restorer, spectrum in _restorers(unit):
            given = unit.detector.model(gain_error, kernel if spectrum else None)
            started = time.perf_counter()
            images = [restorer.restore(z, given, unit.dose).image - tau for z in low_dose]
            seconds = (time.perf_counter() - started) / len(images)
            rows.append(Row(unit, gain_error, group(label, np.stack(images), seconds), fd))
    for row in rows:
        row.goal = goal(row)
        row.record = record(row)
    return rows


def goal(row: Row) -> str:
    """'ok', 'miss: …' (by how much) or '—' for LD and FD."""
    if row.gain_error is None:
        return "—"
    ratio = row.figures.protocol.rn / row.fd.protocol.rn
    misses = []
    if row.gain_error != 0:
        low, high = GOAL_MISCALIBRATED
    elif row.unit.dose < 0.5:
        low, high = -math.inf, GOAL_QUARTER_DOSE_MAX
    else:
        low, high = GOAL_HALF_DOSE
    if ratio > high:
        misses.append(f"RN/FD {ratio - high:+.2f} over {high:.2f}")
    elif ratio < low:
        misses.append(f"RN/FD {ratio - low:+.2f} under {low:.2f}")
    kept = row.figures.calcification_retention
    if kept < GOAL_CALCIFICATION:
        misses.append(f"calc. {kept - GOAL_CALCIFICATION:+.3f} under {GOAL_CALCIFICATION:.2f}")
    note = " (calc. n/a: no calcification in the breast)" if math.isnan(kept) else ""
    return ("ok" if not misses else "miss: " + "; ".join(misses)) + note


def record(row: Row) -> dict[str, str | float]:
    unit, f, fd = row.unit, row.figures, row.fd
    return {
        "phantom_seed": unit.phantom_seed,
        "detector": unit.detector.name,
        "gain": unit.detector.gain,
        "electronic_noise": unit.detector.electronic_noise,
        "offset": unit.detector.offset,
        "crosstalk": unit.crosstalk,
        "dose": unit.dose,
        "gain_error": "" if row.gain_error is None else row.gain_error,
        "method": f.method,
        "rn_over_fd": f.protocol.rn / fd.protocol.rn,
        "exact_rn_over_fd": f.exact.rn / fd.exact.rn,
        "mnse_over_fd": f.protocol.mnse / fd.protocol.mnse,
        "rn_pct": 100 * f.protocol.rn,
        "b2_pct": 100 * f.protocol.b2,
        "exact_b2_pct": 100 * f.exact.b2,
        "calcification_retention": f.calcification_retention,
        "seconds_per_image": f.seconds_per_image,
        "goal": row.goal,
    }


def markdown_rows(records: Sequence[dict[str, str | float]]) -> str:
    lines = [
        "| phantom | detector (λ, σe, τ) | crosstalk | dose | λ error | method | RN/FD | exact RN/FD | MNSE/FD "
        "| RN (%) | B² (%) | exact B² (%) | calc. kept | s/image | goal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        error = r["gain_error"]
        shown_error = "—" if error == "" else f"{100 * float(error):+.0f} %"
        lines.append(
            f"| {r['phantom_seed']} | {r['detector']} ({r['gain']:g}, {r['electronic_noise']:g}, {r['offset']:g}) "
            f"| {r['crosstalk']:g} | {r['dose']:g} | {shown_error} | {r['method']} | {r['rn_over_fd']:.3f} "
            f"| {r['exact_rn_over_fd']:.3f} | {r['mnse_over_fd']:.3f} | {r['rn_pct']:.2f} | {r['b2_pct']:.3f} "
            f"| {r['exact_b2_pct']:.3f} | {r['calcification_retention']:.3f} | {r['seconds_per_image']:.2f} "
            f"| {r['goal']} |"
        )
    return "\n".join(lines) + "\n"


def report(records: Sequence[dict[str, str | float]], settings: dict[str, object], wall_s: float) -> str:
    met = sum(1 for r in records if r["goal"] == "ok")
    judged = sum(1 for r in records if r["goal"] != "—")
    lines = [
        "# Robustness study (bench/robustness.py)",
        "",
        f"- machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        *(f"- {key}: {value}" for key, value in settings.items()),
        f"- wall time: {wall_s:.1f} s",
        f"- goals met: {met} of {judged} restored rows",
        "",
        "RN/FD and MNSE/FD: relative to FD's, by seed 000's protocol (pseudo-GT from the N references);",
        "exact: against the noise-free truth. B² in % of the signal. LD is rescaled, (z − τ)/γ.",
        "λ error: the restorer is given λ·(1 + error); the data were acquired with λ (LD and FD: —).",
        "With crosstalk, 'MB <blend>' is told the detector's measured GAT-domain kernel (BM3D with the",
        "noise spectrum); 'MB <blend>, white' assumes white noise. Goals: RN/FD 0.95–1.05 at 50 % dose,",
        "≤ 1.10 at 25 %, 0.90–1.15 under miscalibration; calcification contrast kept ≥ 0.95.",
        "",
    ]
    return "\n".join(lines) + markdown_rows(records)


def csv_text(records: Sequence[dict[str, str | float]]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows(records)
    return text.getvalue()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Robustness of LD/FD/MB/deep restoration over phantoms, detectors, crosstalk, dose and λ error.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--size", type=parse_size, default=(256, 208), help="phantom size ROWSxCOLS")
    parser.add_argument("--pixel-spacing", type=float, default=0.07, help="phantom pitch, mm (0.07: native)")
    parser.add_argument("--phantoms", type=int, default=1, help="number of phantoms")
    parser.add_argument("--first-seed", type=int, default=5000, help="seed of the first phantom (training: < 5000)")
    parser.add_argument(
        "--detectors",
        type=parse_detectors,
        default="hologic,noisy",
        help=f"comma-separated presets ({', '.join(f'{k}={v[0]:g}:{v[1]:g}:{v[2]:g}' for k, v in PRESETS.items())}) "
        "or custom λ:σe:τ / NAME=λ:σe:τ",
    )
    parser.add_argument("--crosstalk", type=parse_floats, default="0,0.25,0.5", help="3×3 crosstalk strengths")
    parser.add_argument("--doses", type=parse_floats, default="0.5,0.25", help="dose fractions")
    parser.add_argument(
        "--miscalibration", type=parse_floats, default="0,0.15,-0.15", help="relative λ errors given to restorers"
    )
    parser.add_argument(
        "--blends", type=parse_blends, default=f"{DEFAULT_BLEND},plain", help="gat-bm3d blends with BM3D, or none"
    )
    parser.add_argument("--no-white", action="store_true", help="with crosstalk, skip the white-noise MB variants")
    parser.add_argument("--models", nargs="*", default=[], metavar="DIR/NAME", help="trained deep models to score")
    parser.add_argument(
        "--denoisers",
        nargs="*",
        default=[],
        metavar="DIR/NAME[:BLEND]",
        help="trained GAT-domain denoising networks to score in BM3D's place (gat-bm3d; blend: plain for a "
        "network trained through it, else the default)",
    )
    parser.add_argument("--realisations", "-P", type=int, default=3, help="P realisations per group")
    parser.add_argument("--references", "-N", type=int, default=6, help="N full-dose references (pseudo-GT)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a tiny grid for CI smoke tests, overriding the grid: one 192x160 phantom at 0.07 mm, hologic, "
        "crosstalk 0 and 0.5, dose 0.5, no λ error, the default and the plain blend with BM3D, "
        "the deep restorer's default model for half dose, P = 2, N = 3",
    )
    parser.add_argument("--jobs", type=int, default=1, help="parallel processes (one unit of work each)")
    parser.add_argument("--out", type=Path, default=None, help="directory for robustness.md and robustness.csv")
    return parser


def default_deep_model(dose: float) -> str:
    """DIR/NAME of the deep restorer's default model for `dose`, restoring or denoising (the shipped
    one unless $DICOM_NODE_MODEL_DIR says otherwise)."""
    model_dir = default_model_dir()
    return str(model_dir / resolve_model(model_dir, None, dose, TASKS))


def units_of(args: argparse.Namespace) -> list[Unit]:
    if args.quick:
        # 70 µm, the clinical pitch the defaults are judged at; 192×160 is the smallest breast
        # of that pitch holding calcifications
        args.size, args.pixel_spacing, args.phantoms = (192, 160), 0.07, 1
        args.detectors, args.models, args.denoisers = parse_detectors("hologic"), [default_deep_model(0.5)], []
        args.crosstalk, args.doses, args.miscalibration = (0.0, 0.5), (0.5,), (0.0,)
        args.blends, args.realisations, args.references = (DEFAULT_BLEND, "plain"), 2, 3
    if args.realisations < 2 or args.references < 2:
        raise SystemExit("need at least 2 realisations and 2 references")
    if any(not 0 < d < 1 for d in args.doses):
        raise SystemExit("doses must be in (0, 1)")
    if any(not 0 <= c <= 1 for c in args.crosstalk):
        raise SystemExit("crosstalk must be in [0, 1]")
    if any(not e > -1 for e in args.miscalibration):
        raise SystemExit("λ errors must be above −1")
    return [
        Unit(
            phantom_seed=args.first_seed + p,
            detector=detector,
            crosstalk=crosstalk,
            dose=dose,
            gain_errors=tuple(args.miscalibration),
            blends=tuple(args.blends),
            white=not args.no_white,
            models=tuple(str(m) for m in args.models),
            denoisers=tuple(str(m) for m in args.denoisers),
            size=tuple(args.size),
            pixel_spacing_mm=args.pixel_spacing,
            realisations=args.realisations,
            references=args.references,
        )
        for p in range(args.phantoms)
        for detector in args.detectors
        for crosstalk in args.crosstalk
        for dose in args.doses
    ]


def main(argv: Sequence[str] | None = None) -> list[dict[str, str | float]]:
    """Run the grid, print the report, write it to --out; returns the table's records."""
    args = build_parser().parse_args(argv)
    units = units_of(args)
    started = time.perf_counter()
    results: list[list[Row]] = []

    def progress(rows: list[Row]) -> None:
        results.append(rows)
        unit = rows[0].unit
        print(
            f"[{len(results)}/{len(units)}] phantom {unit.phantom_seed}, {unit.detector.name}, crosstalk "
            f"{unit.crosstalk:g}, dose {unit.dose:g}: {time.perf_counter() - started:.0f} s",
            file=sys.stderr,
            flush=True,
        )

    if args.jobs > 1 and len(units) > 1:
        # spawn, not fork: a forked child of a process whose torch threads already ran can hang
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(args.jobs, len(units)), mp_context=spawn) as pool:
            for rows in pool.map(run_unit, units):  # in grid order whatever finishes first
                progress(rows)
    else:
        for unit in units:
            progress(run_unit(unit))
    wall_s = time.perf_counter() - started
    records = [row.record for rows in results for row in rows]
    settings: dict[str, object] = {
        "command": "bench/robustness.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "size": "x".join(map(str, args.size)),
        "pixel spacing (mm)": args.pixel_spacing,
        "phantom seeds": ", ".join(str(args.first_seed + p) for p in range(args.phantoms)),
        "detectors": "; ".join(
            f"{d.name} (λ {d.gain:g}, σe {d.electronic_noise:g}, τ {d.offset:g})" for d in args.detectors
        ),
        "crosstalk": ", ".join(f"{c:g}" for c in args.crosstalk),
        "doses": ", ".join(f"{d:g}" for d in args.doses),
        "λ errors": ", ".join(f"{100 * e:+.0f} %" for e in args.miscalibration),
        "blends": (", ".join(args.blends) or "none")
        + ("" if args.no_white else " (plus white variants with crosstalk)"),
        "models": ", ".join(map(str, args.models)) or "none",
        "denoising networks": ", ".join(map(str, args.denoisers)) or "none",
        "realisations P / references N": f"{args.realisations} / {args.references}",
        "jobs": args.jobs,
    }
    text = report(records, settings, wall_s)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / TABLE_MD).write_text(text, encoding="utf-8")
        (args.out / TABLE_CSV).write_text(csv_text(records), encoding="utf-8")
    return records


if __name__ == "__main__":
    main()
