"""What the commands share: the --config option, loading a configuration that can run, strict JSON."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from dicom_node.config import Config, load_config
from dicom_node.console import strict_json

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
    """`obj` as strict JSON on stdout (`strict_json`)."""
    sys.stdout.write(strict_json(obj) + "\n")
