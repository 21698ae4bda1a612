"""Time BM3D (GAT domain, σ = 1) on a whole synthetic raw image vs on its breast's bounding box.

Not a test: prints seconds, µs/pixel and the ratio. Example: python bench/bench_bm3d.py --size 256
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from dicom_node.restore.denoisers import get_denoiser
from dicom_node.restore.gat import gat_forward
from dicom_node.restore.mask import bounding_box, breast_mask
from dicom_node.restore.noise import NoiseModel


def synthetic_raw(rows: int, cols: int, noise: NoiseModel, rng: np.random.Generator) -> np.ndarray:
    """A half-ellipse breast on the left edge (smooth tissue) in front of bright direct exposure."""
    r, c = np.mgrid[0:rows, 0:cols]
    inside = ((r - rows / 2) / (0.45 * rows)) ** 2 + (c / (0.55 * cols)) ** 2 < 1
    signal = np.where(inside, 600 + 150 * np.sin(r / 20) * np.cos(c / 25), 4000.0)
    return (
        noise.gain * rng.poisson(0.5 * signal / noise.gain)
        + rng.normal(0, noise.electronic_noise, signal.shape)
        + noise.offset
    )


def timed(denoise, image: np.ndarray) -> float:
    started = time.perf_counter()
    denoise(image, 1.0)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image rows (columns = 0.8 × rows, like a detector)")
    parser.add_argument("--hard-thresholding-only", action="store_true", help="skip BM3D's Wiener stage")
    args = parser.parse_args()

    noise = NoiseModel(gain=0.1, electronic_noise=3.0, offset=50.0)
    raw = synthetic_raw(args.size, int(0.8 * args.size), noise, np.random.default_rng(0))
    rows, cols = bounding_box(breast_mask(raw, noise), margin=32)
    denoise = get_denoiser("bm3d", wiener=not args.hard_thresholding_only)
    gat = gat_forward(raw, noise)

    whole = timed(denoise, gat)
    box = timed(denoise, gat[rows, cols])
    box_pixels = (rows.stop - rows.start) * (cols.stop - cols.start)
    print(f"image {raw.shape}, bounding box {box_pixels / raw.size:.0%} of it")
    print(f"whole image : {whole:7.2f} s  {whole / raw.size * 1e6:6.1f} µs/pixel")
    print(f"bounding box: {box:7.2f} s  {box / box_pixels * 1e6:6.1f} µs/pixel")
    print(f"ratio box/whole: {box / whole:.2f}")


if __name__ == "__main__":
    main()
