"""The one restorer registry that every caller (serve, process, trainer, QA) uses.

Built-in restorers live in their own modules and register themselves with `register_restorer`;
those modules are imported on first use, so importing this registry is cheap and never pulls
in torch (a deep restorer imports torch inside its own code, when it runs).
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from dicom_node.restore.noise import NoiseModel

_BUILTIN_MODULES = ("dicom_node.restore.gat_bm3d", "dicom_node.restore.deep")


@dataclass
class Restoration:
    image: np.ndarray  # float64 raw on the target-dose scale, offset τ kept (not clipped/rounded)
    qc: dict[str, float] = field(default_factory=dict)  # QC figures; each restorer documents its keys
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage


class StageTimer:
    """Seconds spent in each stage of a restoration, lap by lap, plus the total."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._started = self._clock = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = now - self._clock
        self._clock = now

    def finish(self) -> dict[str, float]:
        self.timings["total"] = time.perf_counter() - self._started
        return self.timings


class Restorer(Protocol):
    name: str

    def restore(self, raw: np.ndarray, noise: NoiseModel, dose_fraction: float) -> Restoration:
        """Restore `raw`, acquired at `dose_fraction` of the target dose, to the target dose."""
        ...


_FACTORIES: dict[str, Callable[..., Restorer]] = {}


def register_restorer(name: str) -> Callable[[Callable[..., Restorer]], Callable[..., Restorer]]:
    """Class/factory decorator: `create_restorer(name, **options)` calls `factory(**options)`."""

    def decorator(factory: Callable[..., Restorer]) -> Callable[..., Restorer]:
        if name in _FACTORIES and _FACTORIES[name] is not factory:
            raise ValueError(f"a restorer named {name!r} is already registered")
        _FACTORIES[name] = factory
        return factory

    return decorator


def restorer_names() -> list[str]:
    _import_builtins()
    return sorted(_FACTORIES)


def create_restorer(name: str, **options: object) -> Restorer:
    _import_builtins()
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown restorer {name!r}; available: {', '.join(sorted(_FACTORIES))}") from None
    return factory(**options)


def _import_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
