"""A checkpoint becomes a model the node can load: <name>.safetensors plus the <name>.json card.

The card says what the weights are for (network, dose fraction, normalisation), what they were
trained on and how to reproduce them, and carries the weights' sha256, which the node checks
before it restores anything with them.
"""

from __future__ import annotations

import hashlib
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

from safetensors.torch import save

import dicom_node
from dicom_node.errors import ConfigurationError
from dicom_node.files import write_atomically
from dicom_node.restore.deep.card import MODEL_FILE_MODE, ModelCard
from dicom_node.restore.deep.store import file_sha256
from trainer.data import kernel_summary
from trainer.experiment import DataSettings, Experiment, loss_names
from trainer.train import build_experiment_network, load_checkpoint


def code_version() -> str:
    """dicom_node's version, plus `git describe` of the working tree when there is one."""
    try:
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=Path(dicom_node.__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return dicom_node.__version__
    suffix = described.stdout.strip() if described.returncode == 0 else ""
    return f"{dicom_node.__version__} ({suffix})" if suffix else dicom_node.__version__


def export_model(checkpoint_path: Path, name: str, out_dir: Path, *, command: str = "") -> Path:
    """Write out_dir/name.safetensors and out_dir/name.json from a training checkpoint; returns the card's path."""
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ConfigurationError(f"--name must be a plain file name, got {name!r}")
    checkpoint = load_checkpoint(checkpoint_path)
    experiment = Experiment.model_validate(checkpoint["experiment"])
    net = build_experiment_network(experiment)
    net.load_state_dict(checkpoint["model"])  # proves the weights fit before anything is written

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = save({key: value.contiguous() for key, value in net.state_dict().items()})
    write_atomically(out_dir / f"{name}.safetensors", weights, mode=MODEL_FILE_MODE)

    last = checkpoint["history"][-1]
    data, training = experiment.data, experiment.training
    # A checkpoint written before the kernel and the pitch were recorded says nothing of them (its
    # phantoms had make_phantom's default pitch of the day): its card says "not recorded".
    kernel = checkpoint.get("noise_kernel") or {
        **kernel_summary(data.noise_correlation, []),
        "kernel": "not recorded (checkpoint predates the record)",
    }
    training_data = {"phantom_pixel_spacing_mm": None, "full_dose_noise_kernel": "not recorded"}
    training_data.update(checkpoint["training_data"])
    card = ModelCard(
        name=name,
        task=data.task,
        network=experiment.network.name,
        network_options=experiment.network.options,
        receptive_field_radius=int(cast(int, net.receptive_field_radius)),
        parameters=checkpoint["parameters"],
        loss=training.loss,
        dose_fraction=data.dose_fraction,
        normalisation=data.normalisation.build().to_dict(),
        noise_model=checkpoint["noise_model"],
        noise_simulation={
            "method": _simulation_method(data),
            "kernel": kernel["kernel"],  # "detector kernel", "white" or "crosstalk S"; the same for the full dose
            "noise_correlation": data.noise_correlation,
            "kernel_size": kernel["kernel_size"],
            "neighbour_correlation": kernel["neighbour_correlation"],
            "resimulated_every_epoch": data.resimulate,
            "dose_fractions": [data.dose_fraction, *data.extra_dose_fractions],
            "realisations": data.realisations,
            "detector_ranges": data.detector_ranges.model_dump() if data.detector_ranges else None,
            "crosstalk_range": list(data.crosstalk_range) if data.crosstalk_range else None,
            "noise_level_maps": data.noise_level_maps,
        },
        training_data=training_data,
        training={
            "epochs": checkpoint["epoch"],
            "batch_size": training.batch_size,
            "learning_rate": training.learning_rate,
            "betas": list(training.betas),
            "lr_halving_epochs": training.lr_halving_epochs,
            "rn_weight": training.rn_weight if "protocol" in loss_names(training.loss) else None,
            "init_from": _portable(training.init_from),
            "init_from_sha256": file_sha256(training.init_from) if training.init_from else None,
            "seed": experiment.seed,
            "device": checkpoint["device"],
            "hardware": checkpoint.get("hardware", "not recorded (checkpoint predates the record)"),
            "seconds": round(sum(row["seconds"] for row in checkpoint["history"]), 1),
        },
        validation={
            "psnr": last["val_psnr"],
            "ssim": last["val_ssim"],
            "loss": last["val_loss"],
            "epoch": last["epoch"],
            "low_dose_input": checkpoint["input_baseline"],
        },
        code_version=code_version(),
        weights_sha256=hashlib.sha256(weights).hexdigest(),  # what file_sha256 of the written file gives
        synthetic_only=data.source == "phantom",
        notes=experiment.notes,
        reproduce=" && ".join(c for c in (checkpoint["command"], command) if c),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    return card.write(out_dir / f"{name}.json")


def _simulation_method(data: DataSettings) -> str:
    if data.low_dose_from == "truth":
        return "acquired from the phantoms' truth (dicom_node.sim.acquisition.acquire), each patch its own dose and detector"
    return "VST-domain dose reduction (dicom_node.sim.dose.simulate_dose_reduction)"


def _portable(path: Path | None) -> str | None:
    """`path` relative to the project when inside it (a card must not name this machine's folders)."""
    if path is None:
        return None
    resolved = Path(path).resolve()
    project = Path(dicom_node.__file__).resolve().parents[1]
    return str(resolved.relative_to(project)) if resolved.is_relative_to(project) else str(path)
