"""The restoration networks of the seed papers, built by name.

Every network maps a normalised image [B, 1, H, W] (float32) to the restored image of the same
shape, is fully convolutional (any H, W; zero padding keeps the size) and exposes
`receptive_field_radius`: an output pixel depends only on input pixels at most this many pixels
away (Chebyshev distance), so tiles with a margin of at least this radius reproduce untiled
inference exactly. The radius is computed from the layers by `conv_chain_radius`.

Several networks use batch normalisation: call `.eval()` before inference so that the running
statistics from training are used and each image is restored independently of its batch (and of
its tiling).

Submodules are imported on first use: listing the names needs no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from dicom_node.errors import ConfigurationError

if TYPE_CHECKING:
    from torch import nn

# name -> (submodule, factory): the factory's keyword arguments are the network's options.
_NETWORKS = {
    "hresnet": ("hresnet", "HResNet"),
    "resnet-at": ("resnet_at", "ResNetAT"),
    "dncnn": ("dncnn", "DnCNN"),
    "cnn5": ("cnn5", "CNN5"),
    "cascade": ("cascade", "build_cascade"),
}


def network_names() -> list[str]:
    return sorted(_NETWORKS)


def build_network(name: str, **options: object) -> nn.Module:
    """A freshly initialised network; `options` are its constructor's keyword arguments."""
    try:
        module_name, factory_name = _NETWORKS[name]
    except KeyError:
        raise ConfigurationError(f"unknown network {name!r}; known: {', '.join(network_names())}") from None
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, factory_name)(**options)


def conv_chain_radius(network: nn.Module) -> int:
    """Receptive-field radius of a network whose convolutions wider than 1×1 all lie on one chain.

    A k×k convolution with dilation d widens the dependence by d·(k − 1)/2 pixels on each side;
    along a chain the widenings add up, and skip connections only add shorter paths (1×1
    convolutions, batch norm, ReLU and additions widen nothing). This holds for every network
    here, so the radius is the sum over all convolutions.
    """
    from torch import nn

    radius = 0
    for layer in network.modules():
        if isinstance(layer, nn.Conv2d):
            if layer.stride != (1, 1) or any(k % 2 == 0 for k in layer.kernel_size):
                raise ValueError("only odd, stride-1 convolutions keep the image size")
            radius += max(d * (k - 1) // 2 for k, d in zip(layer.kernel_size, layer.dilation, strict=True))
    return radius
