"""Tiled inference: a fully convolutional network over a whole image, tile by tile, exactly.

Torch is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import numpy as np

from dicom_node.restore.device import autocast

if TYPE_CHECKING:
    import torch


def tiled_inference(
    net: torch.nn.Module,
    image: np.ndarray,
    *,
    tile: int = 512,
    margin: int | None = None,
    batch: int = 4,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Apply a fully convolutional `net` to a 2-D image tile by tile; equals one whole-image pass.

    `image` is [H, W], or [C, H, W] for a network with several input channels (an image and its
    noise-level maps); the output is the network's first channel, [H, W].

    Each tile is a tile×tile window of the image itself (fewer pixels where the image is
    smaller) of which only the part at least `margin` px from a cut edge is kept: a cut edge
    (the network's zero padding inside the image) reaches no further than the receptive-field
    radius, while at the image's own border the window sees exactly what the whole-image pass
    sees. Windows are shifted inwards at the borders so all have one size and batch together.
    On CUDA runs under bf16 (or fp16) autocast, on the CPU in float32 (`dicom_node.restore.device`).
    """
    import torch

    radius = int(cast(int, net.receptive_field_radius))  # every network of the registry declares it
    margin = radius if margin is None else margin
    if margin < radius:
        raise ValueError(f"margin {margin} px is below the network's receptive-field radius {radius} px")
    if tile <= 2 * margin:
        raise ValueError(f"tile {tile} px leaves nothing inside two margins of {margin} px")
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3:
        raise ValueError(f"tiled_inference needs a [H, W] or [C, H, W] image, got shape {image.shape}")
    device = torch.device(device) if device is not None else next(net.parameters()).device
    tiles = [
        (rows, cols) for rows in _spans(image.shape[1], tile, margin) for cols in _spans(image.shape[2], tile, margin)
    ]
    output = np.full_like(image[0], np.nan)  # a pixel no tile covered would show
    with torch.inference_mode(), autocast(device):
        for first in range(0, len(tiles), batch):
            group = tiles[first : first + batch]
            windows = np.stack([image[:, rows.window, cols.window] for rows, cols in group])
            result = net(torch.from_numpy(windows).to(device)).float().cpu().numpy()[:, 0]
            for (rows, cols), out in zip(group, result, strict=True):
                output[rows.core, cols.core] = out[rows.kept, cols.kept]
    return output


class _Span:
    """One axis of a tile: the window given to the network and the core kept from it."""

    def __init__(self, window_start: int, window_stop: int, core_start: int, core_stop: int) -> None:
        self.window = slice(window_start, window_stop)
        self.core = slice(core_start, core_stop)
        self.kept = slice(core_start - window_start, core_stop - window_start)


def _spans(length: int, tile: int, margin: int) -> list[_Span]:
    if length <= tile:
        return [_Span(0, length, 0, length)]
    core = tile - 2 * margin
    spans = []
    for start in range(0, length, core):
        window_start = min(max(start - margin, 0), length - tile)
        spans.append(_Span(window_start, window_start + tile, start, min(start + core, length)))
    return spans
