"""One restoration of one mammogram: noise model → restorer → derived instance.

The `process` command, `demo` and the worker all call `restore_mammogram`, so an image restored
offline and one restored by the running node are the same object (same pixels, same
deterministic UIDs). What to run is a `Plan` (pipeline, its options, dose fraction), decided once
— from a profile when a worker claims a job, or from the command line — and then used as is.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom import Dataset

from dicom_node import __version__
from dicom_node.config import Config, Profile
from dicom_node.detectors import noise_model_for
from dicom_node.errors import ConfigurationError, InputRefused
from dicom_node.imaging import MammoImage, build_derived
from dicom_node.qa.flags import qc_flags
from dicom_node.restore.common import check_shape
from dicom_node.restore.noise import NoiseModel
from dicom_node.restore.qc import image_qc
from dicom_node.restore.registry import Environment, Provenance, check_restorer_options, create_restorer


@dataclass(frozen=True)
class Plan:
    """How one image is restored: the restorer, its options and the input's dose fraction."""

    pipeline: str
    dose_fraction: float
    profile: str
    options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of_profile(cls, name: str, profile: Profile) -> Plan:
        return cls(profile.pipeline, profile.dose_fraction, name, profile.restorer_options)


@dataclass(frozen=True)
class NoiseOverrides:
    """Noise parameters given on the command line; each one replaces the detector entry's value."""

    gain: float | None = None
    electronic_noise: float | None = None
    offset: float | None = None

    def complete(self) -> bool:
        return None not in (self.gain, self.electronic_noise, self.offset)

    def given(self) -> bool:
        return self != NoiseOverrides()


@dataclass
class Processed:
    dataset: Dataset
    noise: NoiseModel
    noise_source: str
    provenance: Provenance
    qc: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    qc_flags: list[dict[str, Any]] = field(default_factory=list)  # figures outside [qc.thresholds]
    restored: np.ndarray | None = None  # on the full-dose scale, before rounding (the worker's thumbnails)


def environment_of(config: Config) -> Environment:
    """What this node gives every restorer: the worker's device and the model directory."""
    return Environment(device=config.worker.device, model_dir=config.model_dir)


def check_profiles(config: Config) -> None:
    """Every profile names a registered restorer with options it takes; else one ConfigurationError line."""
    for name, profile in config.profiles.items():
        try:
            check_restorer_options(profile.pipeline, profile.restorer_options)
        except ConfigurationError as exc:
            where = config.path or "embedded defaults"
            raise ConfigurationError(f"{where}: profiles.{name}: {exc}") from None


def resolve_noise(config: Config, image: MammoImage, overrides: NoiseOverrides | None = None) -> tuple[NoiseModel, str]:
    """The image's noise model and where it came from: the flags, else its detector entry.

    `overrides` are the command line's (None where there is none, as in the worker: then a refusal
    does not offer flags).
    """
    if overrides is None:
        model, name = noise_model_for(config, image.params.detector_serial, image.pixels.shape)
        return model, f"detector {name}"
    if overrides.complete():
        assert overrides.gain is not None and overrides.electronic_noise is not None and overrides.offset is not None
        return NoiseModel(overrides.gain, overrides.electronic_noise, overrides.offset), "command line"
    missing = [
        flag
        for flag, value in (
            ("--gain", overrides.gain),
            ("--electronic-noise", overrides.electronic_noise),
            ("--offset", overrides.offset),
        )
        if value is None
    ]
    model, name = noise_model_for(
        config, image.params.detector_serial, image.pixels.shape, or_else=f"pass {', '.join(missing)}"
    )
    model = NoiseModel(
        model.gain if overrides.gain is None else overrides.gain,
        model.electronic_noise if overrides.electronic_noise is None else overrides.electronic_noise,
        model.offset if overrides.offset is None else overrides.offset,
        model.kernel,
    )
    return model, f"detector {name}" + (" with command-line overrides" if overrides.given() else "")


def restore_mammogram(
    image: MammoImage,
    config: Config,
    plan: Plan,
    *,
    overrides: NoiseOverrides | None = None,
    station_name: str | None = None,
) -> Processed:
    """Restore `image` as `plan` says and build its derived DICOM instance."""
    if not image.params.for_processing:
        raise InputRefused(
            "the image is MG For Presentation (processed, not linear in dose); "
            "restoration needs the raw For Processing image"
        )
    if not 0 < plan.dose_fraction <= 1:
        raise InputRefused(f"dose fraction must be in (0, 1], got {plan.dose_fraction}")
    check_shape(image.pixels.shape)  # before any native code runs
    rows, cols = image.pixels.shape
    if rows * cols > config.worker.max_megapixels * 1e6:
        raise InputRefused(
            f"the image is {rows}×{cols} px ({rows * cols / 1e6:.0f} megapixels); [worker] max_megapixels "
            f"allows {config.worker.max_megapixels:g}"
        )
    noise, noise_source = resolve_noise(config, image, overrides)
    restorer = create_restorer(plan.pipeline, environment_of(config), **plan.options)
    raw = image.pixels.astype(np.float64)
    restoration = restorer.restore(raw, noise, plan.dose_fraction)

    started = time.perf_counter()
    top = 2**image.params.bits_stored - 1
    restored = restoration.image
    provenance = restoration.provenance
    spacing = image.params.pixel_spacing_mm
    qc = {
        **restoration.qc,
        **image_qc(
            raw,
            restored,
            noise,
            plan.dose_fraction,
            saturation=top,
            pixel_area_mm2=spacing[0] * spacing[1] if spacing else None,
        ),
        "clipped_fraction": float(np.mean((restored < 0) | (restored > top))),
    }
    qc_seconds = time.perf_counter() - started
    started = time.perf_counter()
    dataset = build_derived(
        image.dataset,
        restored,
        method=f"{provenance.describe()} restoration to full dose from dose fraction {plan.dose_fraction:g}",
        profile=plan.profile,
        model_name=provenance.model_name,
        model_digest=provenance.model_digest,
        description=f"noise model: gain {_describe_gain(noise.gain)}, electronic noise {noise.electronic_noise:g}, offset {noise.offset:g}",
        node_version=__version__,
        station_name=station_name or config.node.ae_title,
    )
    timings = dict(restoration.timings)
    timings["image_qc"] = qc_seconds
    timings["derive"] = time.perf_counter() - started
    flags = qc_flags(qc, config.qc.effective_thresholds)
    return Processed(dataset, noise, noise_source, provenance, qc, timings, flags, restored)


WARM_UP_SHAPE = (128, 96)  # a small synthetic breast: every restorer's code path, in well under a second


def warm_up(config: Config) -> list[str]:
    """Load every profile's libraries and models now (torch, BM3D, the default model for its dose),
    so the first image does not pay for them: each profile's restorer restores a small synthetic
    breast once. Returns one line per profile that could not (its jobs will fail the same way)."""
    from dicom_node.sim.acquisition import acquire
    from dicom_node.sim.phantom import make_phantom

    noise = NoiseModel(0.1, 3.0, 50.0)
    phantom = make_phantom(WARM_UP_SHAPE, seed=0)
    problems = []
    for name, profile in config.profiles.items():
        plan = Plan.of_profile(name, profile)
        low_dose = acquire(phantom.signal, noise, plan.dose_fraction, 0).astype(np.float64)
        try:
            create_restorer(plan.pipeline, environment_of(config), **plan.options).restore(
                low_dose, noise, plan.dose_fraction
            )
        except Exception as exc:  # a profile that cannot restore: said once now, and by each of its jobs
            problems.append(f"profile {name!r} is not ready: {type(exc).__name__}: {exc}")
    return problems


def report(processed: Processed, plan: Plan) -> dict[str, Any]:
    """What one restoration did, as the JSON object `process --json` prints (timings added by the caller)."""
    provenance, noise = processed.provenance, processed.noise
    return {
        "pipeline": plan.pipeline,
        "options": dict(provenance.options),
        "model": {"name": provenance.model_name, "digest": provenance.model_digest} if provenance.model_name else None,
        "device": provenance.device,
        "dose_fraction": plan.dose_fraction,
        "noise": {
            "source": processed.noise_source,
            "gain": float(noise.gain) if np.ndim(noise.gain) == 0 else "map",
            "electronic_noise": noise.electronic_noise,
            "offset": noise.offset,
        },
        "sop_instance_uid": str(processed.dataset.SOPInstanceUID),
        "qc": processed.qc,
        "qc_flags": processed.qc_flags,
    }


def _describe_gain(gain: float | np.ndarray) -> str:
    if np.ndim(gain) == 0:
        return f"{float(gain):g}"
    return f"map (median {float(np.median(gain)):g})"
