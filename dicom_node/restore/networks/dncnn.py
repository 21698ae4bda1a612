"""DnCNN (Zhang et al. 2017; seed 001's baseline): residual learning of the noise.

`layers` convolutions of 3×3: conv+ReLU, (layers − 2)×(conv+BN+ReLU), conv; the stack predicts
the noise and the output is x − noise. Defaults (DnCNN-17, 64 features): 556,096 parameters,
radius 17. The convolutions before batch norm have no bias (BN's shift replaces it).
"""

from __future__ import annotations

import torch
from torch import nn

from dicom_node.restore.networks import conv_chain_radius


class DnCNN(nn.Module):
    def __init__(self, features: int = 64, layers: int = 17) -> None:
        super().__init__()
        if layers < 3:
            raise ValueError("DnCNN needs at least 3 layers")
        stack: list[nn.Module] = [nn.Conv2d(1, features, 3, padding=1), nn.ReLU()]
        for _ in range(layers - 2):
            stack += [nn.Conv2d(features, features, 3, padding=1, bias=False), nn.BatchNorm2d(features), nn.ReLU()]
        stack.append(nn.Conv2d(features, 1, 3, padding=1, bias=False))
        self.noise = nn.Sequential(*stack)
        self.receptive_field_radius = conv_chain_radius(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.noise(x)
