"""The one device and precision policy, shared by inference (the node) and training (the trainer).

- `select_device("auto")`: CUDA when a GPU is available, else the CPU; "cuda" without a GPU and
  unknown names are configuration errors.
- `autocast(device)`: on CUDA, autocast to bfloat16 where the GPU supports it, else float16; on the
  CPU, float32 (no autocast).
- `needs_grad_scaler(device)`: training needs a GradScaler only under float16 autocast (bfloat16
  has float32's exponent range, so its gradients do not underflow).

Torch is imported inside the functions, so importing this module stays cheap and torch-free.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from dicom_node.errors import ConfigurationError

if TYPE_CHECKING:
    import torch

DEVICE_NAMES = ("auto", "cuda", "cpu")


def select_device(name: str) -> torch.device:
    """The torch device for a configured name: auto, cuda or cpu."""
    import torch

    if name not in DEVICE_NAMES:
        raise ConfigurationError(f"unknown device {name!r} (auto, cuda or cpu)")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError("device 'cuda' was asked for but no CUDA GPU is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype on `device`: bfloat16 (or float16 without bf16 support) on CUDA; None on the CPU."""
    import torch

    if torch.device(device).type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device | str) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA (`autocast_dtype`), nothing on the CPU."""
    import torch

    dtype = autocast_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def needs_grad_scaler(device: torch.device | str) -> bool:
    """True only when training on `device` autocasts to float16 (whose small gradients underflow)."""
    import torch

    return autocast_dtype(device) == torch.float16
