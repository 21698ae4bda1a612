"""What the commands share: the --config option, loading a configuration that can run, strict JSON."""

from __future__ import annotations

import json
import math
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from dicom_node.config import Config, load_config

ConfigOption = Annotated[
    Optional[Path],
    typer.Option(
        "--config", "-c", help="Configuration file (TOML); default $DICOM_NODE_CONFIG, else the embedded defaults."
    ),
]


def load_runnable_config(path: Path | None) -> Config:
    """The configuration, with every profile's restorer and options checked (for commands that restore)."""
    from dicom_node.pipeline.processing import check_profiles

    config = load_config(path)
    check_profiles(config)
    return config


def print_json(obj: Any) -> None:
    """`obj` as JSON on stdout; numbers that are not finite become null (NaN is not JSON)."""
    json.dump(_finite(obj), sys.stdout, indent=2, default=str, allow_nan=False)
    sys.stdout.write("\n")


def _finite(obj: Any) -> Any:
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _finite(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(value) for value in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return _finite(obj.item())
    return obj
