"""Run the Debian DICOM tools the tests check against; a missing tool fails the test, naming its package.

Also the simulated inputs the tests feed the node: the embedded defaults' SIM-0001 detector and
low-dose phantom mammograms acquired with it.
"""

import shutil
import subprocess
import tomllib
from functools import cache
from importlib import resources
from pathlib import Path

import pytest

DEBIAN_PACKAGES = {
    "dciodvfy": "dicom3tools",
    "gdcmconv": "libgdcm-tools",
    "dcmcjpls": "dcmtk",
    "dcmcjpeg": "dcmtk",
    "dcmconv": "dcmtk",
    "dcmcrle": "dcmtk",
    "dcmdump": "dcmtk",
}


def require_tool(name: str) -> str:
    """The tool's path, or a test failure saying which Debian package provides it."""
    path = shutil.which(name)
    if path is None:
        package = DEBIAN_PACKAGES.get(name, "?")
        pytest.fail(
            f"{name} is not installed; it comes with the Debian package {package} "
            f"(apt-get install -y --no-install-recommends {package})",
            pytrace=False,
        )
    return path


def run_tool(name: str, *args: str | Path) -> subprocess.CompletedProcess:
    """Run a tool that must succeed; its output is in the failure message if it does not."""
    result = subprocess.run([require_tool(name), *map(str, args)], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        pytest.fail(f"{name} {' '.join(map(str, args))} exited {result.returncode}:\n{result.stdout}{result.stderr}")
    return result


def dciodvfy_errors(path: str | Path) -> list[str]:
    """The "Error" lines dciodvfy reports for a DICOM file (it exits 1 when there are any)."""
    result = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120)
    lines = (result.stdout + result.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    print(
        f"dciodvfy {Path(path).name}: {len(errors)} errors, "
        f"{sum(line.startswith('Warning') for line in lines)} warnings"
    )
    return errors


def gdcmconv(source: Path, target: Path, *options: str) -> Path:
    """Re-encode with GDCM, e.g. ``--j2k``, ``--jpegls``, ``--jpeg``, ``--rle``, ``--lossy``."""
    run_tool("gdcmconv", *options, source, target)
    return target


def dcmtk_convert(tool: str, source: Path, target: Path, *options: str) -> Path:
    """Re-encode with a DCMTK converter: ``dcmcjpls``, ``dcmcjpeg`` or ``dcmconv``."""
    run_tool(tool, *options, source, target)
    return target


def transfer_syntax_of(path: Path) -> str:
    """The Transfer Syntax UID a file declares, as dcmdump reads it (independent of pydicom)."""
    output = run_tool("dcmdump", "+P", "TransferSyntaxUID", "-Un", path).stdout
    return output.split("[", 1)[1].split("]", 1)[0]


SIM_DETECTOR = "SIM-0001"


@cache
def sim_noise_model():
    """The noise model of the simulated detector, as the embedded defaults (dicom_node/defaults/node.toml)
    calibrate it, read from the file itself so that the tests and the node cannot disagree."""
    from dicom_node.restore.noise import NoiseModel

    text = resources.files("dicom_node").joinpath("defaults/node.toml").read_text()
    entry = tomllib.loads(text)["detectors"][SIM_DETECTOR]
    return NoiseModel(entry["gain"], entry["electronic_noise"], entry["offset"])


def low_dose_mammogram(
    path: Path,
    seed: int,
    shape: tuple[int, int] = (256, 208),
    dose_fraction: float = 0.5,
    noise_seed: int | None = None,
    **dataset_options,
) -> Path:
    """A phantom acquired by the simulated detector at `dose_fraction`, written as a raw DICOM mammogram.

    The phantom comes from `seed`, the noise from `noise_seed` (default: `seed`); `dataset_options`
    go to `raw_mammogram_dataset` (its default detector serial is SIM-0001).
    """
    from dicom_node.imaging import raw_mammogram_dataset, save_dataset
    from dicom_node.sim.acquisition import acquire
    from dicom_node.sim.phantom import make_phantom

    phantom = make_phantom(shape, seed=seed)
    pixels = acquire(
        phantom.signal, sim_noise_model(), dose_fraction, rng_or_seed=seed if noise_seed is None else noise_seed
    )
    save_dataset(raw_mammogram_dataset(pixels, seed=seed, **dataset_options), path)
    return path
