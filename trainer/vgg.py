"""VGG16's convolutional part, loaded from a local copy of torchvision's ImageNet weights.

There is no torchvision here and nothing may be downloaded, so the layers are built by hand with
torchvision's exact indices: `features.0.weight` … `features.28.bias` (13 convolutions, ReLUs and
5 max-pools at indices 4, 9, 16, 23, 30). A state dict in torchvision's layout, such as
`vgg16-397923af.pth`, loads directly; its `classifier.*` keys are ignored.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dicom_node.errors import ConfigurationError

# Output channels per convolution, "M" for a 2×2 max-pool (torchvision's configuration "D").
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")

WHERE_TO_GET_WEIGHTS = (
    "The perceptual losses (pl1..pl4, pl4-nopool) need torchvision's ImageNet VGG16 weights as a local "
    "file; they are never downloaded. Copy vgg16-397923af.pth (the state dict of "
    "torchvision.models.vgg16(weights='IMAGENET1K_V1'), published at "
    "https://download.pytorch.org/models/vgg16-397923af.pth) onto this machine and give its path."
)


class VGG16Features(nn.Module):
    """`self.features` is torchvision's `vgg16().features`, layer for layer."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in VGG16_LAYOUT:
            if isinstance(item, int):
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU()]
                channels = item
            else:  # "M"
                layers.append(nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def load_vgg16_features(path: Path | str | None) -> VGG16Features:
    """Frozen VGG16 features (eval mode, no gradients for its weights) from a local weights file.

    No file, a missing one or one of another layout is a `ConfigurationError` saying where to get it.
    """
    if path is None:
        raise ConfigurationError(f"no VGG16 weights file given. {WHERE_TO_GET_WEIGHTS}")
    path = Path(path)
    if not path.is_file():
        raise ConfigurationError(f"VGG16 weights file {path} does not exist. {WHERE_TO_GET_WEIGHTS}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ConfigurationError(
            f"{path} is not a readable torch state dict ({error}). {WHERE_TO_GET_WEIGHTS}"
        ) from error
    if not isinstance(state, dict):
        raise ConfigurationError(f"{path} holds a {type(state).__name__}, not a state dict. {WHERE_TO_GET_WEIGHTS}")
    with torch.device("meta"):  # no time spent initialising weights that are replaced at once
        network = VGG16Features()
    features = {key: value for key, value in state.items() if key.startswith("features.")}
    expected = network.state_dict()
    missing = sorted(set(expected) - set(features))
    unexpected = sorted(set(features) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(features) if features[k].shape != expected[k].shape)
    if missing or unexpected or wrong_shape:
        raise ConfigurationError(
            f"{path} is not in torchvision's VGG16 layout (missing {missing[:4]}, unexpected "
            f"{unexpected[:4]}, wrong shape {wrong_shape[:4]}). {WHERE_TO_GET_WEIGHTS}"
        )
    network.load_state_dict(features, assign=True)
    return network.requires_grad_(False).eval()
