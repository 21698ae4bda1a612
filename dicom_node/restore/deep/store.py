"""The model store: a directory of <name>.safetensors (weights) and <name>.json (model card).

The card (`ModelCard`), written by `python -m trainer export`, says what the weights are
(network, options, dose fraction, normalisation) and carries the weights' sha256, which is
checked before any use. A missing, broken or mismatched model is a `ConfigurationError`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Collection
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node.errors import ConfigurationError
from dicom_node.restore.deep.card import ModelCard

if TYPE_CHECKING:
    import torch

MODEL_DIR_VARIABLE = "DICOM_NODE_MODEL_DIR"
SHIPPED_MODEL_DIR = Path(__file__).resolve().parents[2] / "models"
DOSE_TOLERANCE = 1e-6


def default_model_dir() -> Path:
    """$DICOM_NODE_MODEL_DIR when set, else the models shipped with the package."""
    return Path(os.environ.get(MODEL_DIR_VARIABLE) or SHIPPED_MODEL_DIR)


def file_sha256(path: Path) -> str:
    """A weights file's digest as model cards record it (`weights_sha256`): sha256 of its bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_card(model_dir: Path, name: str) -> ModelCard:
    """The model card <name>.json, checked for the fields the node relies on."""
    path = Path(model_dir) / f"{name}.json"
    if not path.is_file():
        raise ConfigurationError(f"no model {name!r} in {model_dir} (missing {path.name})")
    return ModelCard.read(path)


def load_model(model_dir: Path, name: str) -> tuple[torch.nn.Module, ModelCard]:
    """(network in eval mode on the CPU, card) of model `name`, its weights checked against the card."""
    from safetensors.torch import load_file

    card = read_card(model_dir, name)
    weights = Path(model_dir) / f"{name}.safetensors"
    if not weights.is_file():
        raise ConfigurationError(f"model {name!r} has a card but no weights file {weights}")
    digest = file_sha256(weights)
    if digest != card.weights_sha256:
        raise ConfigurationError(
            f"weights of model {name!r} do not match its card (sha256 {digest}, card says "
            f"{card.weights_sha256}): the file was changed or belongs to another model"
        )
    net = _build_network(card.network, card.network_options)
    try:
        net.load_state_dict(load_file(weights), strict=True)
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[0]
        raise ConfigurationError(
            f"weights of model {name!r} do not fit network {card.network!r}: {first_line}"
        ) from None
    return net.eval(), card


def _build_network(name: str, options: dict[str, Any]) -> torch.nn.Module:
    from dicom_node.restore.networks import build_network

    try:
        return build_network(name, **options)
    except TypeError as error:
        raise ConfigurationError(f"bad options for network {name!r}: {error}") from None
    except ValueError as error:  # an unknown name (the message lists the known ones), or a bad option value
        raise ConfigurationError(str(error)) from None


def resolve_model(
    model_dir: Path, name: str | None, dose_fraction: float | None, tasks: Collection[str] = ("restore",)
) -> str:
    """`name` when given, else the directory's model of one of `tasks` serving `dose_fraction` (any
    dose when None; `ModelCard.dose_fractions`), the newest if several. A named model made for
    another task is refused."""
    model_dir = Path(model_dir)
    wanted = " or ".join(repr(task) for task in tasks)
    if name:
        card = read_card(model_dir, name)
        if card.task not in tasks:
            raise ConfigurationError(f"model {name!r} is a {card.task!r} model, not a {wanted} one")
        return name
    if not model_dir.is_dir():
        raise ConfigurationError(f"model directory {model_dir} does not exist (set {MODEL_DIR_VARIABLE} or give one)")
    cards = {
        path.stem: read_card(model_dir, path.stem)
        for path in sorted(model_dir.glob("*.json"))
        if path.with_suffix(".safetensors").is_file()
    }
    cards = {n: card for n, card in cards.items() if card.task in tasks}
    fitting = [n for n, card in cards.items() if dose_fraction is None or serves(card, dose_fraction)]
    if not fitting:
        if dose_fraction is None:
            raise ConfigurationError(f"no {wanted} model in {model_dir}")
        available = (
            ", ".join(f"{'/'.join(f'{d:g}' for d in card.dose_fractions)} ({n})" for n, card in cards.items()) or "none"
        )
        raise ConfigurationError(
            f"no default model for dose fraction {dose_fraction:g} in {model_dir}; available: {available}"
        )
    return max(fitting, key=lambda n: (_created(cards[n]), n))


def serves(card: ModelCard, dose_fraction: float) -> bool:
    """Whether the model was trained for `dose_fraction` (one of its `dose_fractions`)."""
    return any(abs(dose - dose_fraction) <= DOSE_TOLERANCE for dose in card.dose_fractions)


def _created(card: ModelCard) -> float:
    try:
        return datetime.fromisoformat(str(card.created)).timestamp()
    except ValueError:
        return float("-inf")


def cached_model(model_dir: Path, name: str, device: str) -> tuple[torch.nn.Module, ModelCard]:
    """Model `name` on `device`, loaded once per process and weights-file version (a worker loads once;
    a replaced weights file is read again)."""
    weights = Path(model_dir) / f"{name}.safetensors"
    modified = weights.stat().st_mtime_ns if weights.is_file() else 0
    return _cached_model(str(Path(model_dir).resolve()), name, device, modified)


@lru_cache(maxsize=8)
def _cached_model(model_dir: str, name: str, device: str, modified_ns: int) -> tuple[torch.nn.Module, ModelCard]:
    net, card = load_model(Path(model_dir), name)
    return net.to(device), card
