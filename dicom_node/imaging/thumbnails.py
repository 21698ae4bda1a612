"""Small PNG views of one restoration for QA staff: before, after and their difference.

Raw ("For Processing") pixels are linear in dose with the direct exposure brightest, so a view
is the negative log of the offset-free signal (breast bright, as radiologists see it), windowed
on the breast's 1st–99th percentiles of the input; before and after share that window, so a
change of brightness or contrast shows. The difference (input − output on the full-dose scale,
the method noise) is shown around mid-grey at ±3 standard deviations of itself in the breast:
noise looks like noise, removed structure looks like the anatomy. Views are reduced by block
means to at most `THUMBNAIL_SIDE` pixels a side.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from dicom_node.files import write_atomically

THUMBNAIL_SIDE = 512
THUMBNAIL_KINDS = ("before", "after", "difference")


def thumbnail_dir(data_dir: Path, job_id: int) -> Path:
    """Where the worker writes a job's views: data_dir/thumbnails/<job id>/<kind>.png."""
    return data_dir / "thumbnails" / str(job_id)


def _reduce(image: np.ndarray, side: int) -> np.ndarray:
    factor = max(1, int(np.ceil(max(image.shape) / side)))
    rows, cols = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    if factor == 1:
        return image
    return image[:rows, :cols].reshape(rows // factor, factor, cols // factor, factor).mean(axis=(1, 3))


def _png(view: np.ndarray) -> bytes:
    from matplotlib.image import imsave

    buffer = io.BytesIO()
    imsave(buffer, np.clip(view, 0.0, 1.0), cmap="gray", vmin=0.0, vmax=1.0, format="png")
    return buffer.getvalue()


def thumbnail_views(
    before: np.ndarray, after: np.ndarray, offset: float, mask: np.ndarray | None = None, side: int = THUMBNAIL_SIDE
) -> dict[str, np.ndarray]:
    """The three views in [0, 1]: `before` (the input on the full-dose scale) and `after` (the
    restored image), offset `offset` in both, `mask` the breast (None: the whole image)."""
    region = mask if mask is not None and mask.any() else np.ones(before.shape, dtype=bool)
    floor = 1.0  # ADU: log of the offset-free signal, never of zero or less
    log_before = -np.log(np.maximum(before - offset, floor))
    log_after = -np.log(np.maximum(after - offset, floor))
    low, high = np.percentile(log_before[region], [1, 99])
    scale = high - low if high > low else 1.0
    difference = before - after
    spread = 3 * float(np.std(difference[region])) or 1.0
    return {
        "before": _reduce((log_before - low) / scale, side),
        "after": _reduce((log_after - low) / scale, side),
        "difference": _reduce(0.5 + difference / (2 * spread), side),
    }


def write_thumbnails(
    folder: Path, before: np.ndarray, after: np.ndarray, offset: float, mask: np.ndarray | None = None
) -> list[Path]:
    """Write before.png, after.png and difference.png into `folder` (made if missing), atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, view in thumbnail_views(before, after, offset, mask).items():
        written.append(write_atomically(folder / f"{kind}.png", _png(view), mode=0o644))
    return written
