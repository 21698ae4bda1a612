"""The 5-layer CNN of seed 004 (RSNA "Magician's Corner" denoising tutorial).

The paper says only "five layers of two-dimensional convolutions", each with a ReLU, no pooling;
its notebook sets the rest: 64 filters of 3×3, stride 1, "same" padding, a last convolution with
one feature map and no activation, and a direct mapping (no skip from input to output). We follow
that: (layers − 1)×(conv 3×3 + ReLU), conv(→1). The notebook's own mean/std scaling is replaced by
our `Normalisation`. Defaults: 112,001 parameters, radius 5.
"""

from __future__ import annotations

import torch
from torch import nn

from dicom_node.restore.networks import conv_chain_radius


class CNN5(nn.Module):
    def __init__(self, features: int = 64, layers: int = 5, kernel_size: int = 3) -> None:
        super().__init__()
        if layers < 2:
            raise ValueError("CNN5 needs at least 2 layers")
        padding = kernel_size // 2
        stack: list[nn.Module] = []
        channels = 1
        for _ in range(layers - 1):
            stack += [nn.Conv2d(channels, features, kernel_size, padding=padding), nn.ReLU()]
            channels = features
        stack.append(nn.Conv2d(features, 1, kernel_size, padding=padding))
        self.layers = nn.Sequential(*stack)
        self.receptive_field_radius = conv_chain_radius(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
