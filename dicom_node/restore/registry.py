"""The one restorer registry that every caller (serve, process, demo, the trainer) uses.

As timm's factory: `create_restorer(name, environment, **options)` and nothing outside this
module switches on restorer names. Each restorer registers with the pydantic model of its
options, so a profile's options are checked (`check_restorer_options`) before any image comes.
The options are what a profile chooses (gat-bm3d's blend, deep's model); the `Environment` is
what the node provides (the compute device, the model directory).

Built-in restorers live in their own modules and register themselves with `register_restorer`;
those modules are imported on first use, so importing this registry is cheap and never pulls
in torch (a deep restorer imports torch inside its own code, when it runs).
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from dicom_node.errors import ConfigurationError
from dicom_node.restore.noise import NoiseModel

_BUILTIN_MODULES = ("dicom_node.restore.gat_bm3d", "dicom_node.restore.deep")


@dataclass(frozen=True)
class Environment:
    """What the node provides to every restorer: where to compute and where models are."""

    device: str = "auto"  # auto, cpu or cuda
    model_dir: Path | None = None  # trained models (None: $DICOM_NODE_MODEL_DIR, else the shipped ones)


@dataclass(frozen=True)
class Provenance:
    """What produced a restoration, recorded on the job and in the derived image."""

    method: str  # the restorer's name
    device: str = "cpu"
    options: Mapping[str, Any] = field(default_factory=dict)  # the options actually used
    model_name: str | None = None
    model_digest: str | None = None  # sha256 of the weights

    def describe(self) -> str:
        """The method and its options, e.g. 'gat-bm3d blend=plain' (models are named elsewhere)."""
        shown = " ".join(f"{key}={value}" for key, value in sorted(self.options.items()) if key != "model")
        return f"{self.method} {shown}".strip()


@dataclass
class Restoration:
    image: np.ndarray  # float64 raw on the target-dose scale, offset τ kept (not clipped/rounded)
    provenance: Provenance
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


class RestorerOptions(BaseModel):
    """Base of each restorer's options: unknown keys are refused, values are checked."""

    model_config = ConfigDict(extra="forbid", frozen=True)


RestorerFactory = Callable[..., Restorer]


@dataclass(frozen=True)
class _Entry:
    factory: RestorerFactory  # factory(options, environment)
    options: type[RestorerOptions]


_REGISTRY: dict[str, _Entry] = {}


def register_restorer(
    name: str, options: type[RestorerOptions] = RestorerOptions
) -> Callable[[RestorerFactory], RestorerFactory]:
    """Class/factory decorator: `create_restorer(name, env, **opts)` calls `factory(Options(**opts), env)`."""

    def decorator(factory: RestorerFactory) -> RestorerFactory:
        known = _REGISTRY.get(name)
        if known is not None and known.factory is not factory:
            raise ValueError(f"a restorer named {name!r} is already registered")
        _REGISTRY[name] = _Entry(factory, options)
        return factory

    return decorator


def restorer_names() -> list[str]:
    _import_builtins()
    return sorted(_REGISTRY)


def check_restorer_options(name: str, options: Mapping[str, Any]) -> RestorerOptions:
    """The validated options of restorer `name`; ConfigurationError naming every bad key."""
    _import_builtins()
    entry = _REGISTRY.get(name)
    if entry is None:
        raise ConfigurationError(f"unknown restorer {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    try:
        return entry.options(**options)
    except ValidationError as exc:
        problems = [
            f"{'.'.join(map(str, item['loc']))}: "
            + (f"unknown option for restorer {name}" if item["type"] == "extra_forbidden" else item["msg"])
            for item in exc.errors()
        ]
        raise ConfigurationError("; ".join(problems)) from None


def create_restorer(name: str, environment: Environment | None = None, **options: Any) -> Restorer:
    """The restorer `name` with `options` (checked by its options model) in `environment`."""
    checked = check_restorer_options(name, options)
    return _REGISTRY[name].factory(checked, environment or Environment())


def _import_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
