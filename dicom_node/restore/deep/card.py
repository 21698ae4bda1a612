"""The model card: what a model's weights are, for what dose, trained on what, and their sha256.

One schema for both sides: `python -m trainer export` builds a `ModelCard` and writes it as
<name>.json next to <name>.safetensors; the node reads it back with `ModelCard.read`, which checks
what the node relies on (network, network_options, dose_fraction, normalisation, weights_sha256)
and refuses anything else as a `ConfigurationError`. The other fields document the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dicom_node.errors import ConfigurationError
from dicom_node.files import write_atomically
from dicom_node.restore.normalisation import Normalisation

REQUIRED_KEYS = ("network", "network_options", "dose_fraction", "normalisation", "weights_sha256")
TASKS = ("restore", "denoise")
MODEL_FILE_MODE = 0o644  # cards and weights: a shipped model must be readable by the node's user


@dataclass(frozen=True, kw_only=True)
class ModelCard:
    """A model card, field for field as <name>.json holds it (in this order)."""

    name: str = ""
    # "restore": low dose → full dose; "denoise": a GAT-domain denoiser (σ = 1), run inside the GAT,
    # the unbiased inverse and a blend (gat-bm3d's denoiser = "network", or the deep restorer's "CNN on
    # VST"). Cards written before the field are "restore".
    task: str = "restore"
    network: str  # a name of dicom_node.restore.networks.network_names()
    network_options: dict[str, Any]  # the network's constructor options
    receptive_field_radius: int | None = None  # px
    parameters: int | None = None
    loss: str | dict[str, float] | None = None  # the training loss spec (trainer.losses.make_loss)
    dose_fraction: float  # the dose, relative to full dose, of the images the model restores
    normalisation: dict[str, Any]  # Normalisation.to_dict()
    noise_model: dict[str, Any] | None = None  # the detector noise of the training data
    noise_simulation: dict[str, Any] | None = None  # how the low-dose inputs were simulated
    training_data: dict[str, Any] | None = None  # count, source, inputs and their digest
    training: dict[str, Any] | None = None  # optimiser settings, epochs, seed, device
    validation: dict[str, Any] | None = None  # PSNR, SSIM and loss at the last epoch
    code_version: str = ""
    weights_sha256: str  # sha256 of the .safetensors file, checked before any use
    synthetic_only: bool | None = None  # trained on synthetic phantoms only
    notes: str = ""
    reproduce: str = ""  # the commands that made the model
    created: str = ""  # ISO 8601
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # keys of a newer trainer, kept

    def to_dict(self) -> dict[str, Any]:
        """The card as JSON-ready data: the known fields in order, then any `extra` keys."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**data, **self.extra}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def write(self, path: Path) -> Path:
        """Write the card to `path` atomically, readable by all (mode 0644)."""
        return write_atomically(Path(path), self.to_json().encode(), mode=MODEL_FILE_MODE)

    @property
    def dose_fractions(self) -> list[float]:
        """The dose fractions the model serves: every one it was trained at (a denoiser may have
        several), else its one `dose_fraction`."""
        doses = (self.noise_simulation or {}).get("dose_fractions")
        return [float(d) for d in doses] if isinstance(doses, list) and doses else [self.dose_fraction]

    @property
    def normaliser(self) -> Normalisation:
        """The card's normalisation as the object that applies it."""
        return Normalisation.from_dict(self.normalisation)

    @classmethod
    def from_dict(cls, data: Any, source: str = "model card") -> ModelCard:
        """A card from parsed JSON; `source` ("model card PATH") starts each error message."""
        if not isinstance(data, dict):
            raise ConfigurationError(f"{source} must hold a JSON object")
        missing = [key for key in REQUIRED_KEYS if key not in data]
        if missing:
            raise ConfigurationError(f"{source} lacks {', '.join(missing)}")
        if not isinstance(data["network_options"], dict):
            raise ConfigurationError(f"{source}: network_options must be an object")
        try:
            Normalisation.from_dict(data["normalisation"])
            dose_fraction = float(data["dose_fraction"])
        except (TypeError, ValueError, ConfigurationError) as error:
            raise ConfigurationError(f"{source}: {error}") from None
        if data.get("task", "restore") not in TASKS:
            raise ConfigurationError(f"{source}: task must be one of {', '.join(TASKS)}, got {data['task']!r}")
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {key: value for key, value in data.items() if key in known}
        extra = {key: value for key, value in data.items() if key not in known}
        return cls(**{**values, "dose_fraction": dose_fraction}, extra=extra)

    @classmethod
    def read(cls, path: Path) -> ModelCard:
        """The card in the JSON file `path`, checked for what the node relies on."""
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ConfigurationError(f"model card {path} does not exist") from None
        except UnicodeDecodeError as error:
            raise ConfigurationError(f"model card {path} is not valid JSON: {error}") from None
        except OSError as error:
            raise ConfigurationError(f"cannot read model card {path}: {error.strerror or error}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigurationError(f"model card {path} is not valid JSON: {error}") from None
        return cls.from_dict(data, f"model card {path}")
