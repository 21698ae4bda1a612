"""`dicom-node calibrate`: flat-field DICOM files → a detector entry for the configuration.

The fit itself is `dicom_node.restore.calibration` (arrays in, numbers out); this module reads
the files, checks they belong together and writes the `[detectors.SERIAL]` entry (and the gain
map and noise kernel files it names).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

from dicom_node.errors import InputRefused
from dicom_node.files import write_atomically
from dicom_node.imaging import read_mammogram
from dicom_node.restore.calibration import Calibration, calibrate_flat_fields


@dataclass
class DetectorCalibration:
    serial: str
    result: Calibration
    images: int

    def entry(self, gain_map: str | None = None, noise_kernel: str | None = None) -> dict[str, Any]:
        result = self.result
        entry: dict[str, Any] = {
            "gain": round(result.gain, 6),
            "electronic_noise": round(result.electronic_noise, 4),
            "offset": round(result.offset, 3),
        }
        if gain_map is not None:
            entry["gain_map"] = gain_map
        if noise_kernel is not None:
            entry["noise_kernel"] = noise_kernel
        return entry

    def toml(self, gain_map: str | None = None, noise_kernel: str | None = None) -> str:
        return f"# dicom-node calibrate: {self.images} flat fields\n" + tomli_w.dumps(
            {"detectors": {self.serial: self.entry(gain_map, noise_kernel)}}
        )

    def correlation_summary(self) -> str:
        """One line on the measured noise correlation and whether a kernel is part of the model."""
        result = self.result
        if result.kernel_exposures is None:
            return "noise correlation: not measured (needs 2 flat fields at one exposure); white noise assumed"
        vertical, horizontal = result.neighbour_correlations
        exposures = ", ".join(f"{e:g}" for e in result.kernel_exposures)
        figures = (
            f"noise correlation at {exposures} mAs: neighbours {result.neighbour_correlation:.3f} "
            f"(vertical {vertical:.3f}, horizontal {horizontal:.3f}, standard error {result.neighbour_correlation_error:.3f})"
        )
        if result.noise_kernel is None:
            return figures + ": white within the measurement error, no kernel"
        corrections = result.variance_corrections
        corrected = (
            f", noise variances corrected ×{corrections.min():.3f}–{corrections.max():.3f} for it"
            if corrections is not None
            else ""
        )
        side = "×".join(map(str, result.noise_kernel.shape))
        return figures + f": correlated, {side} kernel{corrected}"


def calibrate_files(paths: list[Path], serial: str | None = None) -> DetectorCalibration:
    """Fit the noise model of the detector that took the flat fields `paths` (2+ exposures)."""
    images, exposures, serials = [], [], set()
    for path in paths:
        image = read_mammogram(path)
        if image.params.exposure_mas is None:
            raise InputRefused(f"{path} has no Exposure (mAs); calibration needs each flat field's exposure")
        images.append(image.pixels.astype(np.float64))
        exposures.append(image.params.exposure_mas)
        serials.add(image.params.detector_serial)
    if serial is None:
        if len(serials) != 1 or None in serials:
            raise InputRefused(f"the flat fields name detectors {sorted(map(str, serials))}; pass --serial")
        serial = str(serials.pop())
    return DetectorCalibration(serial, calibrate_flat_fields(images, exposures), len(images))


def save_gain_map(calibration: DetectorCalibration, path: Path, entry_file: Path | None) -> str | None:
    """Write the per-pixel gain map (.npy); returns how the entry names it (relative to `entry_file`)."""
    if calibration.result.gain_map is None:
        return None
    return _save_array(calibration.result.gain_map, path, entry_file)


def save_noise_kernel(calibration: DetectorCalibration, path: Path, entry_file: Path | None) -> str | None:
    """Write the noise kernel κ (.npy) when the noise is correlated; returns how the entry names it.

    White noise (no kernel) writes nothing and returns None.
    """
    if calibration.result.noise_kernel is None:
        return None
    return _save_array(calibration.result.noise_kernel, path, entry_file)


def _save_array(array: np.ndarray, path: Path, entry_file: Path | None) -> str:
    """Write `array` (.npy) atomically; returns its path relative to `entry_file`'s folder (or cwd) if inside."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    write_atomically(path, buffer.getvalue(), mode=0o644)
    base = entry_file.parent.resolve() if entry_file else Path.cwd()
    try:
        return str(path.resolve().relative_to(base))
    except ValueError:
        return str(path.resolve())
