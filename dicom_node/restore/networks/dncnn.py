"""DnCNN (Zhang et al. 2017; seed 001's baseline): residual learning of the noise.

`layers` convolutions of 3×3: conv+ReLU, (layers − 2)×(conv+BN+ReLU), conv; the stack predicts
the noise and the output is x − noise. Defaults (DnCNN-17, 64 features): 556,096 parameters,
radius 17. The convolutions before batch norm have no bias (BN's shift replaces it).

`conditions` > 0 makes it FFDNet-like: the input carries that many noise-level maps after the
image ([B, 1 + conditions, H, W]; `dicom_node.restore.blend.noise_level_maps`), so one network
serves several doses and detectors. They enter through a 1×1 convolution added to the first
layer's, zero at the start: a conditioned network starts as the unconditioned one (and can start
from its trained weights, `training.init_missing`).
"""

from __future__ import annotations

import torch
from torch import nn

from dicom_node.restore.networks import conv_chain_radius


class DnCNN(nn.Module):
    def __init__(self, features: int = 64, layers: int = 17, conditions: int = 0) -> None:
        super().__init__()
        if layers < 3:
            raise ValueError("DnCNN needs at least 3 layers")
        if conditions < 0:
            raise ValueError("conditions must be 0 or more")
        stack: list[nn.Module] = [nn.Conv2d(1, features, 3, padding=1), nn.ReLU()]
        for _ in range(layers - 2):
            stack += [nn.Conv2d(features, features, 3, padding=1, bias=False), nn.BatchNorm2d(features), nn.ReLU()]
        stack.append(nn.Conv2d(features, 1, 3, padding=1, bias=False))
        self.noise = nn.Sequential(*stack)
        self.conditions = conditions
        if conditions:
            self.condition = nn.Conv2d(conditions, features, 1, bias=False)
            nn.init.zeros_(self.condition.weight)
        self.receptive_field_radius = conv_chain_radius(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 1 + self.conditions:
            raise ValueError(
                f"DnCNN with {self.conditions} conditions needs {1 + self.conditions} channels, got {x.shape[1]}"
            )
        image = x[:, :1]
        if not self.conditions:
            return image - self.noise(image)
        features = self.noise[0](image) + self.condition(x[:, 1:])
        return image - self.noise[1:](features)
