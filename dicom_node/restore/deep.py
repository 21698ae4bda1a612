"""Deep restoration: a trained network, applied to the whole image in tiles.

A model directory holds pairs <name>.safetensors (the weights) and <name>.json (the model card
written by `python -m trainer export`: network, options, dose fraction, normalisation, the
weights' sha256, ...). The card's normalisation maps raw pixels to the network and back, exactly
as in training.

Torch is imported inside the functions that need it, so registering this restorer (the registry
imports this module to list restorers) stays cheap and torch-free.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dicom_node.restore.mask import bounding_box, breast_mask
from dicom_node.restore.mb import mean_ratio, validated_input
from dicom_node.restore.noise import NoiseModel
from dicom_node.restore.normalisation import Normalisation
from dicom_node.restore.registry import Restoration, StageTimer, register_restorer

if TYPE_CHECKING:
    import torch

MODEL_DIR_VARIABLE = "DICOM_NODE_MODEL_DIR"
SHIPPED_MODEL_DIR = Path(__file__).resolve().parent.parent / "models"
_CARD_KEYS = ("network", "network_options", "dose_fraction", "normalisation", "weights_sha256")
_DOSE_TOLERANCE = 1e-6
_BOX_MARGIN = 32  # px of background context around the breast, as in the MB path


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


def read_card(model_dir: Path, name: str) -> dict[str, Any]:
    """The model card <name>.json, checked for the keys the node relies on."""
    path = Path(model_dir) / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no model {name!r} in {model_dir} (missing {path.name})")
    try:
        card = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"model card {path} is not valid JSON: {error}") from None
    if not isinstance(card, dict):
        raise ValueError(f"model card {path} must hold a JSON object")
    missing = [key for key in _CARD_KEYS if key not in card]
    if missing:
        raise ValueError(f"model card {path} lacks {', '.join(missing)}")
    if not isinstance(card["network_options"], dict):
        raise ValueError(f"model card {path}: network_options must be an object")
    try:
        Normalisation.from_dict(card["normalisation"])
        float(card["dose_fraction"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"model card {path}: {error}") from None
    return card


def load_model(model_dir: Path, name: str) -> tuple["torch.nn.Module", dict[str, Any]]:
    """(network in eval mode on the CPU, card) of model `name`, its weights checked against the card."""
    from safetensors.torch import load_file

    card = read_card(model_dir, name)
    weights = Path(model_dir) / f"{name}.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"model {name!r} has a card but no weights file {weights}")
    digest = file_sha256(weights)
    if digest != card["weights_sha256"]:
        raise ValueError(
            f"weights of model {name!r} do not match its card (sha256 {digest}, card says "
            f"{card['weights_sha256']}): the file was changed or belongs to another model"
        )
    net = _build_network(card["network"], card["network_options"])
    try:
        net.load_state_dict(load_file(weights), strict=True)
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[0]
        raise ValueError(f"weights of model {name!r} do not fit network {card['network']!r}: {first_line}") from None
    return net.eval(), card


def _build_network(name: str, options: dict[str, Any]) -> "torch.nn.Module":
    from dicom_node.restore.networks import build_network

    try:
        return build_network(name, **options)  # an unknown name raises ValueError, listing the known ones
    except TypeError as error:
        raise ValueError(f"bad options for network {name!r}: {error}") from None


def resolve_model(model_dir: Path, name: str | None, dose_fraction: float) -> str:
    """`name` when given, else the directory's model for `dose_fraction` (the newest if several)."""
    model_dir = Path(model_dir)
    if name:
        read_card(model_dir, name)
        return name
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist (set {MODEL_DIR_VARIABLE} or give one)")
    cards = {
        path.stem: read_card(model_dir, path.stem)
        for path in sorted(model_dir.glob("*.json"))
        if path.with_suffix(".safetensors").is_file()
    }
    fitting = [n for n, card in cards.items() if abs(float(card["dose_fraction"]) - dose_fraction) <= _DOSE_TOLERANCE]
    if not fitting:
        available = ", ".join(f"{float(card['dose_fraction']):g} ({n})" for n, card in cards.items()) or "none"
        raise ValueError(f"no default model for dose fraction {dose_fraction:g} in {model_dir}; available: {available}")
    return max(fitting, key=lambda n: (_created(cards[n]), n))


def _created(card: dict[str, Any]) -> float:
    try:
        return datetime.fromisoformat(str(card.get("created", ""))).timestamp()
    except ValueError:
        return float("-inf")


def tiled_inference(
    net: "torch.nn.Module",
    image: np.ndarray,
    *,
    tile: int = 512,
    margin: int | None = None,
    batch: int = 4,
    device: "torch.device | str | None" = None,
) -> np.ndarray:
    """Apply a fully convolutional `net` to a 2-D image tile by tile; equals one whole-image pass.

    Each tile is a tile×tile window of the image itself (fewer pixels where the image is
    smaller) of which only the part at least `margin` px from a cut edge is kept: a cut edge
    (the network's zero padding inside the image) reaches no further than the receptive-field
    radius, while at the image's own border the window sees exactly what the whole-image pass
    sees. Windows are shifted inwards at the borders so all have one size and batch together.
    On CUDA runs under bf16 (or fp16) autocast; on the CPU in float32.
    """
    import torch

    radius = int(net.receptive_field_radius)
    margin = radius if margin is None else margin
    if margin < radius:
        raise ValueError(f"margin {margin} px is below the network's receptive-field radius {radius} px")
    if tile <= 2 * margin:
        raise ValueError(f"tile {tile} px leaves nothing inside two margins of {margin} px")
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"tiled_inference needs a 2-D image, got shape {image.shape}")
    device = torch.device(device) if device is not None else next(net.parameters()).device
    tiles = [(rows, cols) for rows in _spans(image.shape[0], tile, margin) for cols in _spans(image.shape[1], tile, margin)]
    output = np.full_like(image, np.nan)  # a pixel no tile covered would show
    with torch.inference_mode(), _autocast(device):
        for first in range(0, len(tiles), batch):
            group = tiles[first : first + batch]
            windows = np.stack([image[rows.window, cols.window] for rows, cols in group])[:, None]
            result = net(torch.from_numpy(windows).to(device)).float().cpu().numpy()[:, 0]
            for (rows, cols), out in zip(group, result):
                output[rows.core, cols.core] = out[rows.kept, cols.kept]
    return output


class _Span:
    """One axis of a tile: the window given to the network and the core kept from it."""

    def __init__(self, window_start: int, window_stop: int, core_start: int, core_stop: int) -> None:
        self.window = slice(window_start, window_stop)
        self.core = slice(core_start, core_stop)
        self.kept = slice(core_start - window_start, core_stop - window_start)


def _spans(length: int, tile: int, margin: int) -> list[_Span]:
    if length <= tile:
        return [_Span(0, length, 0, length)]
    core = tile - 2 * margin
    spans = []
    for start in range(0, length, core):
        window_start = min(max(start - margin, 0), length - tile)
        spans.append(_Span(window_start, window_start + tile, start, min(start + core, length)))
    return spans


def _autocast(device: "torch.device") -> contextlib.AbstractContextManager:
    import torch

    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def _select_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"unknown device {device!r} (auto, cuda or cpu)")
    return device


@lru_cache(maxsize=8)
def _cached_model(model_dir: str, name: str, device: str, modified_ns: int) -> tuple["torch.nn.Module", dict[str, Any]]:
    """One load per model, device and weights file version in a process (a worker loads once)."""
    net, card = load_model(Path(model_dir), name)
    return net.to(device), card


@register_restorer("deep")
class DeepRestorer:
    """A trained network restores the image; its model card says how to normalise and for what dose.

    Without `model`, the model directory's model for the requested dose fraction is used (the
    newest if several). A model trained for another dose fraction is refused: a network trained
    to restore 50 % dose would silently mis-restore a 25 % image.

    QC figures (`Restoration.qc`; NaN where undefined):
    - breast_fraction: fraction of the image inside the breast mask;
    - mean_ratio: restored mean / ((z − τ)/r) mean in the breast, offsets removed (≈1: unbiased);
    - dose_fraction_mismatch: |model's dose fraction − requested| (0, or the restore refuses);
    - model_dose_fraction: the dose fraction the model was trained for.

    Timings (seconds): load (resolve, and read the model unless cached), normalise, inference,
    denormalise, qc, total.
    """

    name = "deep"

    def __init__(
        self,
        model: str | None = None,
        model_dir: Path | str | None = None,
        device: str = "auto",
        tile: int = 512,
        batch: int = 4,
    ) -> None:
        self.model = model or None
        self.model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        self.device = _select_device(device)
        self.tile = tile
        self.batch = batch
        self.model_name: str | None = None  # the model used last (resolved by dose fraction when unset)
        self.digest: str | None = None  # its weights' sha256
        self.card: dict[str, Any] | None = None
        if self.model:
            self._load(self.model)

    def _load(self, name: str) -> tuple["torch.nn.Module", dict[str, Any]]:
        weights = self.model_dir / f"{name}.safetensors"
        modified = weights.stat().st_mtime_ns if weights.is_file() else 0
        net, card = _cached_model(str(self.model_dir.resolve()), name, self.device, modified)
        self.model_name, self.digest, self.card = name, card["weights_sha256"], card
        return net, card

    def restore(self, raw: np.ndarray, noise: NoiseModel, dose_fraction: float) -> Restoration:
        raw = validated_input(raw, noise, dose_fraction)
        timer = StageTimer()
        lap = timer.lap
        name = resolve_model(self.model_dir, self.model, dose_fraction)
        net, card = self._load(name)
        model_dose = float(card["dose_fraction"])
        if abs(model_dose - dose_fraction) > _DOSE_TOLERANCE:
            raise ValueError(
                f"model {name!r} was trained for dose fraction {model_dose:g}, not {dose_fraction:g}; "
                f"choose a model for {dose_fraction:g} or leave the model unset to use the default"
            )
        normalisation = Normalisation.from_dict(card["normalisation"])
        lap("load")
        # Like the MB path: the network sees the breast's bounding box (it was trained on breast
        # patches); the direct-exposure background outside it is rescaled linearly.
        mask = breast_mask(raw, noise)
        rows, cols = bounding_box(mask, max(_BOX_MARGIN, net.receptive_field_radius))
        box_noise = noise.crop(rows, cols)
        image = (raw - noise.offset) / dose_fraction + noise.offset
        x = normalisation.to_network(raw[rows, cols], box_noise, dose_fraction)
        lap("normalise")
        output = tiled_inference(net, x, tile=self.tile, batch=self.batch, device=self.device) if x.size else x
        lap("inference")
        if x.size:
            image[rows, cols] = normalisation.from_network(output, box_noise)
        lap("denormalise")
        qc = {
            "breast_fraction": float(mask.mean()),
            "bbox_pixels": float(x.size),
            "mean_ratio": mean_ratio(image, raw, noise, dose_fraction, mask),
            "dose_fraction_mismatch": abs(model_dose - dose_fraction),
            "model_dose_fraction": model_dose,
        }
        lap("qc")
        return Restoration(image=image, qc=qc, timings=timer.finish())
