"""One restoration of one mammogram: noise parameters → restorer → derived instance.

The `process` command and the worker both call `restore_mammogram`, so an image restored offline
and one restored by the running node are the same object (same pixels, same deterministic UIDs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from pydicom import Dataset

from dicom_node import __version__
from dicom_node.config import Config
from dicom_node.imaging import MammoImage, build_derived
from dicom_node.restore.noise import NoiseModel
from dicom_node.restore.registry import create_restorer


class ProcessingError(Exception):
    """An image this node cannot restore as asked, worded as one line for a person."""


@dataclass(frozen=True)
class NoiseOverrides:
    """Noise parameters given on the command line; each one replaces the detector entry's value."""

    gain: float | None = None
    electronic_noise: float | None = None
    offset: float | None = None

    def complete(self) -> bool:
        return None not in (self.gain, self.electronic_noise, self.offset)


@dataclass
class Processed:
    dataset: Dataset
    noise: NoiseModel
    noise_source: str
    qc: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    model_digest: str | None = None
    model_name: str | None = None


def restorer_options(config: Config, pipeline: str, *, model: str | None = None, blend: str | None = None) -> dict:
    """The options each restorer takes from a profile or the command line."""
    if pipeline == "gat-bm3d":
        return {"blend": blend} if blend else {}
    if pipeline == "deep":
        return {"model": model or None, "model_dir": config.model_dir, "device": config.worker.device}
    return {}


def resolve_noise(
    config: Config, image: MammoImage, overrides: NoiseOverrides = NoiseOverrides()
) -> tuple[NoiseModel, str]:
    """The image's noise model and where it came from: the flags, else its detector entry."""
    serial = image.params.detector_serial
    if overrides.complete():
        gain, sigma, offset = overrides.gain, overrides.electronic_noise, overrides.offset
        return NoiseModel(gain, sigma, offset), "command line"
    entry = config.detector_for(serial)
    if entry is None:
        missing = [
            flag
            for flag, value in (
                ("--gain", overrides.gain),
                ("--electronic-noise", overrides.electronic_noise),
                ("--offset", overrides.offset),
            )
            if value is None
        ]
        where = str(config.path) if config.path else "the embedded defaults"
        raise ProcessingError(
            f"no noise parameters for detector {serial or '(no Device Serial Number)'}: "
            f"add [detectors.{serial or 'default'}] to {where} (see `dicom-node calibrate`) "
            f"or pass {', '.join(missing)}"
        )
    name, _ = entry
    model = config.noise_model(name, image.pixels.shape)
    model = NoiseModel(
        model.gain if overrides.gain is None else overrides.gain,
        model.electronic_noise if overrides.electronic_noise is None else overrides.electronic_noise,
        model.offset if overrides.offset is None else overrides.offset,
    )
    source = f"detector {name}" + (" with command-line overrides" if overrides != NoiseOverrides() else "")
    return model, source


def restore_mammogram(
    image: MammoImage,
    config: Config,
    *,
    pipeline: str,
    dose_fraction: float,
    profile: str,
    overrides: NoiseOverrides = NoiseOverrides(),
    model_name: str | None = None,
    station_name: str | None = None,
    options: dict | None = None,
) -> Processed:
    """Restore `image` to the target dose and build its derived DICOM instance."""
    if not image.params.for_processing:
        raise ProcessingError(
            "the image is MG For Presentation (processed, not linear in dose); "
            "restoration needs the raw For Processing image"
        )
    if not 0 < dose_fraction <= 1:
        raise ProcessingError(f"dose fraction must be in (0, 1], got {dose_fraction}")
    noise, noise_source = resolve_noise(config, image, overrides)
    try:
        restorer = create_restorer(pipeline, **(options or {}))
    except (ValueError, FileNotFoundError) as exc:
        raise ProcessingError(str(exc)) from None

    try:
        restoration = restorer.restore(image.pixels.astype(np.float64), noise, dose_fraction)
    except (ValueError, FileNotFoundError) as exc:  # restorers say so when the request cannot be met
        raise ProcessingError(str(exc)) from None

    started = time.perf_counter()
    top = 2 ** image.params.bits_stored - 1
    restored = restoration.image
    qc = dict(restoration.qc)
    qc["clipped_fraction"] = float(np.mean((restored < 0) | (restored > top)))
    dataset = build_derived(
        image.dataset,
        restored,
        method=f"{pipeline}{_describe_options(options)} restoration to full dose from dose fraction {dose_fraction:g}",
        profile=profile,
        model_name=getattr(restorer, "model_name", None) or model_name,
        model_digest=getattr(restorer, "digest", None),
        description=f"noise model: gain {_describe_gain(noise.gain)}, electronic noise {noise.electronic_noise:g}, offset {noise.offset:g}",
        node_version=__version__,
        station_name=station_name or config.node.ae_title,
    )
    timings = dict(restoration.timings)
    timings["derive"] = time.perf_counter() - started
    device = getattr(restorer, "device", "cpu")
    return Processed(
        dataset, noise, noise_source, qc, timings, device,
        getattr(restorer, "digest", None), getattr(restorer, "model_name", None) or model_name,
    )


def _describe_options(options: dict | None) -> str:
    shown = {k: v for k, v in (options or {}).items() if k == "blend"}  # paths and names are said elsewhere
    return "".join(f" {key}={value}" for key, value in sorted(shown.items()))


def _describe_gain(gain: float | np.ndarray) -> str:
    if np.ndim(gain) == 0:
        return f"{float(gain):g}"
    return f"map (median {float(np.median(gain)):g})"


