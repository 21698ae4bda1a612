"""The cascade of seed 003: a perceptual-loss network, then an MSE network for what is left.

Stage 1 trains `first` (perceptual loss) to map the low-dose image to Ŷ. Stage 2 freezes it and
trains `second` with MSE on Ŷ → target. The seed's second network predicts the difference Ŷ − Y
and subtracts it; our residual networks add a predicted correction to their input, so
`second(Ŷ)` is Ŷ corrected by that (negated) difference and the output is `second(first(x))`.
Pair it with a residual second network (hresnet, resnet-at, dncnn) to keep that meaning.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn


class Cascade(nn.Module):
    """`first` then `second`; stage 2 freezes the parameters under "first." (and keeps it in eval)."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first = first
        self.second = second
        # Every network of the registry declares its radius as an int (an nn.Module attribute is untyped).
        radius = cast(int, first.receptive_field_radius) + cast(int, second.receptive_field_radius)
        self.receptive_field_radius = radius

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


def build_cascade(
    first: str = "hresnet",
    second: str = "hresnet",
    first_options: dict | None = None,
    second_options: dict | None = None,
) -> Cascade:
    """A cascade of two registered networks, named with their options (as in a model card)."""
    from dicom_node.restore.networks import build_network

    if "cascade" in (first, second):
        raise ValueError("a cascade's stages must be single networks")
    return Cascade(build_network(first, **(first_options or {})), build_network(second, **(second_options or {})))
