"""From a configuration's detector entries to the noise models restoration needs.

The one place that answers "is this detector configured?" for every caller (the worker,
`process`, `demo`, `phantom`, the selftest, the trainer's data): it picks the entry for a Device
Serial Number, loads its gain map and noise kernel, and says which entry to add when there is none.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dicom_node.config import Config
from dicom_node.errors import ConfigurationError
from dicom_node.restore.noise import NoiseModel

DEFAULT_ENTRY = "default"


def detector_entry(config: Config, serial: str | None) -> str | None:
    """The name of the entry for a Device Serial Number, else the `default` entry, else None."""
    if serial and serial in config.detectors:
        return serial
    return DEFAULT_ENTRY if DEFAULT_ENTRY in config.detectors else None


def detector_noise(config: Config, name: str, shape: tuple[int, ...] | None = None) -> NoiseModel:
    """The noise model of entry `name`, with its gain map (checked against `shape`) and noise kernel loaded."""
    if name not in config.detectors:
        raise ConfigurationError(f"detector {name!r} is not in {_where(config)}: add [detectors.{name}]")
    detector = config.detectors[name]
    gain: float | np.ndarray = detector.gain
    if detector.gain_map is not None:
        gain = _load_gain_map(config.resolve(detector.gain_map), name, shape)
    kernel = None
    if detector.noise_kernel is not None:
        kernel = _load_noise_kernel(config.resolve(detector.noise_kernel), name)
    try:
        return NoiseModel(gain, detector.electronic_noise, detector.offset, kernel)
    except ConfigurationError as exc:
        raise ConfigurationError(f"detectors.{name}: {exc}") from None


def noise_model_for(
    config: Config, serial: str | None, shape: tuple[int, ...] | None = None, *, or_else: str = ""
) -> tuple[NoiseModel, str]:
    """(noise model, entry name) for an image from detector `serial`; refuses an unknown detector.

    `or_else` names another remedy the caller offers (e.g. command-line flags) in the refusal.
    """
    name = detector_entry(config, serial)
    if name is None:
        raise ConfigurationError(
            f"no noise parameters for detector {serial or '(no Device Serial Number)'}: "
            f"add [detectors.{serial or DEFAULT_ENTRY}] to {_where(config)} (see `dicom-node calibrate`)"
            + (f" or {or_else}" if or_else else "")
        )
    return detector_noise(config, name, shape), name


def _load_gain_map(path: Path, name: str, shape: tuple[int, ...] | None) -> np.ndarray:
    try:
        gain = np.load(path)
    except OSError as exc:
        raise ConfigurationError(f"detectors.{name}.gain_map: cannot read {path}: {exc.strerror or exc}") from None
    except ValueError:  # numpy's own words speak of pickles: not what IT needs to hear
        raise ConfigurationError(f"detectors.{name}.gain_map: cannot read {path}: not a .npy array file") from None
    if shape is not None and gain.shape != tuple(shape):
        raise ConfigurationError(
            f"detectors.{name}.gain_map: map is {'×'.join(map(str, gain.shape))} "
            f"but the image is {'×'.join(map(str, shape))}"
        )
    return gain


def _load_noise_kernel(path: Path, name: str) -> np.ndarray:
    key = f"detectors.{name}.noise_kernel"
    try:
        kernel = np.load(path)
    except OSError as exc:
        raise ConfigurationError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None
    except ValueError:
        raise ConfigurationError(f"{key}: cannot read {path}: not a .npy array file") from None
    if not isinstance(kernel, np.ndarray) or not np.issubdtype(kernel.dtype, np.number) or np.iscomplexobj(kernel):
        raise ConfigurationError(f"{key}: {path} does not hold an array of real numbers")
    kernel = kernel.astype(np.float64)
    try:
        NoiseModel(1.0, 0.0, 0.0, kernel)  # the model's own rules: 2-D, odd sides, finite, unit energy
    except ConfigurationError as exc:
        raise ConfigurationError(f"{key}: {path}: {exc}") from None
    return kernel


def _where(config: Config) -> str:
    return str(config.path) if config.path else "the embedded defaults"
