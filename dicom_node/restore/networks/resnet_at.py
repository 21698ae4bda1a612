"""ResNet-AT (seed 001): a deep residual network that predicts the noise in the Anscombe domain.

The network itself is domain-agnostic; `Normalisation("anscombe", ...)` brings the images to the
Anscombe domain where the noise is white with unit variance. Conv(1→64)+ReLU, 15 residual blocks
of three (conv 3×3, BN, ReLU) whose skip is a 1×1 convolution, and a final conv(64→1) giving the
noise map V; the output is x − V. Defaults: 1,731,137 parameters (the seed's "1.700.000"),
47 convolutions of 3×3 on the longest path (radius 47).
"""

from __future__ import annotations

import torch
from torch import nn

from dicom_node.restore.networks import conv_chain_radius


class ResidualBlock(nn.Module):
    def __init__(self, features: int, convolutions: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(convolutions):
            layers += [nn.Conv2d(features, features, 3, padding=1), nn.BatchNorm2d(features), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.skip = nn.Conv2d(features, features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.skip(x)


class ResNetAT(nn.Module):
    def __init__(self, features: int = 64, blocks: int = 15) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.Conv2d(1, features, 3, padding=1), nn.ReLU())
        self.blocks = nn.Sequential(*(ResidualBlock(features) for _ in range(blocks)))
        self.tail = nn.Conv2d(features, 1, 3, padding=1)
        self.receptive_field_radius = conv_chain_radius(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.tail(self.blocks(self.head(x)))
