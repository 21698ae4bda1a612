"""HResNet (seed 000): a residual network with hierarchical skip connections.

Three levels of skips: the whole network adds its input to the predicted noise field (level 1),
every pair of residual blocks adds the features from before the pair (level 2), and every block
adds its own input (level 3). With the defaults (64 features, 4 blocks) this is the seed's
network: 297,665 parameters, 10 convolutions of 3×3 on the longest path, so a 21×21 receptive
field (radius 10). Layout follows the authors' published code: no ReLU after the first
convolution, ReLU after each addition.
"""

from __future__ import annotations

import torch
from torch import nn

from dicom_node.restore.networks import conv_chain_radius


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN, plus the input, then ReLU."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(features, features, 3, padding=1),
            nn.BatchNorm2d(features),
            nn.ReLU(),
            nn.Conv2d(features, features, 3, padding=1),
            nn.BatchNorm2d(features),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + x)


class HResNet(nn.Module):
    def __init__(self, features: int = 64, blocks: int = 4) -> None:
        super().__init__()
        if blocks < 2 or blocks % 2:
            raise ValueError("HResNet needs an even number of residual blocks (they skip in pairs)")
        self.conv_first = nn.Conv2d(1, features, 3, padding=1)
        self.blocks = nn.ModuleList(ResidualBlock(features) for _ in range(blocks))
        self.conv_last = nn.Conv2d(features, 1, 3, padding=1)
        self.receptive_field_radius = conv_chain_radius(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.conv_first(x)
        for first, second in zip(self.blocks[::2], self.blocks[1::2], strict=True):
            features = torch.relu(second(first(features)) + features)
        return torch.relu(x + self.conv_last(features))
