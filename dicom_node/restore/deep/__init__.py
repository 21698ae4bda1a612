"""Deep restoration: the model store and its cards, tiled inference and the restorer that uses them."""

from dicom_node.restore.deep.card import ModelCard
from dicom_node.restore.deep.restorer import DeepRestorer
from dicom_node.restore.deep.store import default_model_dir, file_sha256, load_model, read_card, resolve_model
from dicom_node.restore.deep.tiling import tiled_inference

__all__ = [
    "DeepRestorer",
    "ModelCard",
    "default_model_dir",
    "file_sha256",
    "load_model",
    "read_card",
    "resolve_model",
    "tiled_inference",
]
