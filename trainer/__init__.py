"""Trains the deep restoration networks and exports them as models the node can load.

`python -m trainer train --config EXPERIMENT.toml` makes low-/full-dose patch pairs from raw
mammograms or phantoms and trains a network of `dicom_node.restore.networks`; `export` writes
<name>.safetensors + <name>.json (the model card) for `dicom_node.restore.deep`; `evaluate`
compares models with MB, FD and LD on repeated phantom acquisitions (seed 000's protocol).
The trainer imports dicom_node, never the reverse.
"""
