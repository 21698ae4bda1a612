"""Deep restoration: the model store, tiled inference and the restorer that uses both."""

from dicom_node.restore.deep.restorer import DeepRestorer
from dicom_node.restore.deep.store import default_model_dir, file_sha256, load_model, read_card, resolve_model
from dicom_node.restore.deep.tiling import tiled_inference

__all__ = ["DeepRestorer", "default_model_dir", "file_sha256", "load_model", "read_card", "resolve_model",
           "tiled_inference"]
