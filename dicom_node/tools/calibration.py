"""`dicom-node calibrate`: flat-field DICOM files → a detector entry for the configuration.

The fit itself is `dicom_node.restore.calibration` (arrays in, numbers out); this module reads
the files, checks they belong together and writes the `[detectors.SERIAL]` entry.
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

    def entry(self, gain_map: str | None = None) -> dict[str, Any]:
        result = self.result
        entry: dict[str, Any] = {
            "gain": round(result.gain, 6),
            "electronic_noise": round(result.electronic_noise, 4),
            "offset": round(result.offset, 3),
        }
        if gain_map is not None:
            entry["gain_map"] = gain_map
        return entry

    def toml(self, gain_map: str | None = None) -> str:
        return f"# dicom-node calibrate: {self.images} flat fields\n" + tomli_w.dumps(
            {"detectors": {self.serial: self.entry(gain_map)}}
        )


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
    buffer = io.BytesIO()
    np.save(buffer, calibration.result.gain_map)
    write_atomically(path, buffer.getvalue(), mode=0o644)
    base = entry_file.parent.resolve() if entry_file else Path.cwd()
    try:
        return str(path.resolve().relative_to(base))
    except ValueError:
        return str(path.resolve())
