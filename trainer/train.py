"""The training loop: Adam with a step schedule, a checkpoint every epoch, resumable, deterministic.

Everything a later export needs (the experiment, the data summary, the noise model, the command
that started the run, the per-epoch validation history) travels inside the checkpoint, so
`python -m trainer export` needs only the checkpoint file. Device and precision follow the node's
one policy (`dicom_node.restore.device`): CUDA runs under bf16 autocast (fp16 with a GradScaler
where the GPU lacks bf16); the CPU runs in float32.
"""

from __future__ import annotations

import csv
import io
import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dicom_node.errors import ConfigurationError
from dicom_node.files import write_atomically
from dicom_node.restore.device import autocast, needs_grad_scaler, select_device
from dicom_node.restore.networks import build_network, network_names
from trainer.data import PatchData
from trainer.experiment import Experiment, TrainingSettings
from trainer.losses import make_loss, ssim

CHECKPOINT = "checkpoint.pt"
CURVES_CSV = "curves.csv"
CURVES_PNG = "curves.png"
EVAL_BATCH = 64
_RESUME_MAY_CHANGE = ("epochs", "device", "threads")
OUTPUT_MODE = 0o644  # checkpoint and curves, readable like any file the run writes
HISTORY_FIELDS = ("epoch", "learning_rate", "train_loss", "val_loss", "val_psnr", "val_ssim", "seconds")


@dataclass
class TrainResult:
    checkpoint: Path
    history: list[dict]


def make_deterministic(seed: int) -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def build_experiment_network(experiment: Experiment) -> torch.nn.Module:
    name = experiment.network.name
    if name not in network_names():
        raise ConfigurationError(f"network.name: unknown network {name!r}; known: {', '.join(network_names())}")
    try:
        return build_network(name, **experiment.network.options)
    except (TypeError, ValueError) as exc:  # an unknown option, or a value the network refuses
        raise ConfigurationError(f"network.options: {exc}") from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Weights from an exported model (.safetensors) or a training checkpoint (.pt)."""
    if not path.is_file():
        raise ConfigurationError(f"training.init_from: {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def load_initial_weights(net: torch.nn.Module, path: Path, prefix: str = "", may_lack: Sequence[str] = ()) -> None:
    """Start from another model's weights, e.g. a perceptual-loss network from an MAE network,
    (with `prefix`) a cascade's first stage from a trained single network, or (with `may_lack`)
    a conditioned network from an unconditioned one, its conditioning branch left as initialised."""
    state = {prefix + key: value for key, value in read_state_dict(path).items()}
    result = net.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k.startswith(prefix) and not frozen(k, list(may_lack))]
    if result.unexpected_keys or missing:
        wrong = (result.unexpected_keys or missing)[0]
        raise ConfigurationError(f"training.init_from: {path} does not fit the network (first mismatch: {wrong})")


def zero_final_convolution(net: torch.nn.Module) -> None:
    """Start a residual network as the identity by zeroing its output convolution (the last
    Conv2d it registers): seed 000's reason for a small-variance initialisation ("the output
    before training is close to the input"), taken to its limit. The default initialisation
    instead adds a correction of the order of the signal itself, which takes many steps to undo."""
    last = [module for module in net.modules() if isinstance(module, torch.nn.Conv2d)][-1]
    torch.nn.init.zeros_(last.weight)
    if last.bias is not None:
        torch.nn.init.zeros_(last.bias)


def frozen(name: str, prefixes: list[str]) -> bool:
    return any(name.startswith(prefix) for prefix in prefixes)


def set_train_mode(net: torch.nn.Module, settings: TrainingSettings) -> None:
    """Train mode, except frozen parts stay in eval mode (their batch-norm statistics stay fixed)."""
    net.train()
    for name, module in net.named_modules():
        if name and frozen(name + ".", settings.freeze):
            module.eval()


def validate(
    net: torch.nn.Module, pairs: tuple[np.ndarray, np.ndarray], loss_fn, device: torch.device, realisations: int = 1
) -> dict[str, float]:
    """Loss, PSNR (dB, peak = the largest validation target) and SSIM over the validation patches
    (the image target: channel 0 of packed targets)."""
    inputs, targets = pairs
    peak = float(targets[:, :1].max())
    step = EVAL_BATCH - EVAL_BATCH % realisations  # whole groups of realisations per batch
    totals = {"loss": 0.0, "se": 0.0, "ssim": 0.0}
    net.eval()
    with torch.no_grad(), autocast(device):
        for start in range(0, len(inputs), step):
            x = torch.from_numpy(inputs[start : start + step]).to(device)
            y = torch.from_numpy(targets[start : start + step]).to(device)
            out = net(x).float()
            count = len(x)
            totals["loss"] += float(loss_fn(out, y)) * count
            totals["se"] += float(torch.mean((out - y[:, :1]) ** 2)) * count
            totals["ssim"] += float(ssim(out, y[:, :1])) * count
    n = len(inputs)
    return {"loss": totals["loss"] / n, "psnr": psnr(totals["se"] / n, peak), "ssim": totals["ssim"] / n}


def psnr(mse: float, peak: float) -> float:
    return 10 * math.log10(peak**2 / mse) if mse > 0 else math.inf


def input_baseline(pairs: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
    """PSNR and SSIM of the low-dose input itself (what the network must beat; raw domain only,
    where input and target share one scale)."""
    inputs, targets = (torch.from_numpy(a) for a in pairs)
    mse = float(torch.mean((inputs - targets) ** 2))
    return {"psnr": psnr(mse, float(targets.max())), "ssim": float(ssim(inputs, targets))}


def train(
    experiment: Experiment,
    out_dir: Path,
    *,
    resume: bool = False,
    command: str = "",
    progress: bool = True,
    data: PatchData | None = None,
) -> TrainResult:
    """Train (or with `resume`, continue) `experiment`, writing checkpoint and curves to `out_dir`."""
    settings = experiment.training
    out_dir = Path(out_dir)
    checkpoint_path = out_dir / CHECKPOINT
    previous = _resume_state(checkpoint_path, experiment) if resume else None
    if not resume and checkpoint_path.exists():
        raise ConfigurationError(f"{checkpoint_path} exists: pass --resume to continue it, or choose another --out")
    if settings.threads:
        torch.set_num_threads(settings.threads)
    make_deterministic(experiment.seed)
    try:
        device = select_device(settings.device)
    except ConfigurationError as exc:
        raise ConfigurationError(f"training.device: {exc}") from None

    try:
        loss_fn = make_loss(
            settings.loss,
            vgg_weights=settings.vgg_weights,
            device=device,
            realisations=experiment.data.realisations,
            rn_weight=settings.rn_weight,
            scale=experiment.data.normalisation.scale,
        )
    except ConfigurationError as exc:  # an unknown loss, or no VGG16 weights for a perceptual one: name the key
        raise ConfigurationError(f"training.loss: {exc}") from None
    data = data or PatchData(experiment.data, experiment.seed)
    net = build_experiment_network(experiment).to(device)
    if previous is None and settings.identity_start:
        zero_final_convolution(net)
    if previous is None and settings.init_from:
        load_initial_weights(net, settings.init_from, settings.init_prefix, settings.init_missing)
    for name, parameter in net.named_parameters():
        parameter.requires_grad_(not frozen(name, settings.freeze))
    trainable = [p for p in net.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigurationError("training.freeze: every parameter is frozen")
    optimiser = torch.optim.Adam(trainable, lr=settings.learning_rate, betas=settings.betas)
    schedule = torch.optim.lr_scheduler.StepLR(optimiser, step_size=settings.lr_halving_epochs, gamma=0.5)
    scaler = torch.amp.GradScaler(device.type, enabled=needs_grad_scaler(device))

    if previous is not None:
        net.load_state_dict(previous["model"])
        optimiser.load_state_dict(previous["optimizer"])
        schedule.load_state_dict(previous["scheduler"])
        if scaler.is_enabled() and previous["scaler"]:  # empty when saved without a scaler (CPU, bf16)
            scaler.load_state_dict(previous["scaler"])
        history, first_epoch = previous["history"], previous["epoch"] + 1
    else:
        started = time.perf_counter()
        metrics = validate(net, data.validation_pairs, loss_fn, device, experiment.data.realisations)
        history = [_row(0, settings.learning_rate, math.nan, metrics, time.perf_counter() - started)]
        first_epoch = 1

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {
        "experiment": experiment.model_dump(mode="json"),
        "training_data": data.summary(),
        "noise_model": data.noise_summary(),
        "noise_kernel": data.kernel_summary(),
        "input_baseline": input_baseline(data.validation_pairs) if data.normalisation.domain == "raw" else None,
        "command": (previous or {}).get("command") or command,
        "device": device.type,
        "hardware": (previous or {}).get("hardware") or describe_hardware(device),
        "parameters": sum(p.numel() for p in net.parameters()),
    }
    for epoch in range(first_epoch, settings.epochs + 1):
        started = time.perf_counter()
        inputs, targets = data.training_pairs(epoch)
        order = _shuffled(len(inputs), experiment.data.realisations, np.random.default_rng([experiment.seed, 6, epoch]))
        learning_rate = optimiser.param_groups[0]["lr"]
        set_train_mode(net, settings)
        loss_sum = 0.0
        batches = range(0, len(order), settings.batch_size)
        bar = tqdm(batches, desc=f"epoch {epoch}/{settings.epochs}", disable=not progress, leave=False, unit="batch")
        for start in bar:
            chosen = order[start : start + settings.batch_size]
            x = torch.from_numpy(inputs[chosen]).to(device)
            y = torch.from_numpy(targets[chosen]).to(device)
            optimiser.zero_grad(set_to_none=True)
            with autocast(device):
                out = net(x)
            loss = loss_fn(out.float(), y)
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()
            loss_sum += loss.item() * len(chosen)
            bar.set_postfix(loss=f"{loss.item():.4g}")
        schedule.step()
        metrics = validate(net, data.validation_pairs, loss_fn, device, experiment.data.realisations)
        row = _row(epoch, learning_rate, loss_sum / len(order), metrics, time.perf_counter() - started)
        history.append(row)
        if progress:
            tqdm.write(
                f"epoch {epoch}/{settings.epochs}: train loss {row['train_loss']:.5g}, "
                f"validation loss {row['val_loss']:.5g}, PSNR {row['val_psnr']:.2f} dB, "
                f"SSIM {row['val_ssim']:.4f} ({row['seconds']:.1f} s)"
            )
        _save_checkpoint(
            checkpoint_path,
            {
                **state,
                "epoch": epoch,
                "history": history,
                "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                "optimizer": optimiser.state_dict(),
                "scheduler": schedule.state_dict(),
                "scaler": scaler.state_dict(),
            },
        )
        write_curves(out_dir, history)
    return TrainResult(checkpoint_path, history)


def _shuffled(count: int, realisations: int, rng: np.random.Generator) -> np.ndarray:
    """A random order of `count` samples that keeps each patch's realisations consecutive."""
    groups = rng.permutation(count // realisations)
    return (groups[:, None] * realisations + np.arange(realisations)).ravel()


def describe_hardware(device: torch.device) -> str:
    """The machine a run trains on, for the model card: the GPU's name, or the CPU and its cores."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA), {os.cpu_count()} CPU cores"
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} threads"
    )


def _row(epoch: int, learning_rate: float, train_loss: float, metrics: dict, seconds: float) -> dict:
    return {
        "epoch": epoch,
        "learning_rate": learning_rate,
        "train_loss": train_loss,
        "val_loss": metrics["loss"],
        "val_psnr": metrics["psnr"],
        "val_ssim": metrics["ssim"],
        "seconds": seconds,
    }


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigurationError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: torch raises several types
        raise ConfigurationError(f"{path} is not a trainer checkpoint: {exc}") from None


def _resume_state(path: Path, experiment: Experiment) -> dict:
    """The checkpoint to continue, refused when it was trained with a different experiment
    (only the number of epochs, the device and the thread count may change)."""
    previous = load_checkpoint(path)
    free = dict.fromkeys(_RESUME_MAY_CHANGE)
    before = dict(previous["experiment"], training={**previous["experiment"]["training"], **free})
    now = experiment.model_dump(mode="json")
    now["training"].update(free)
    if before != now:
        different = sorted(k for k in now if now[k] != before.get(k))
        raise ConfigurationError(f"{path} was trained with a different experiment ({', '.join(different)} differ)")
    return previous


def _save_checkpoint(path: Path, checkpoint: dict) -> None:
    """Atomically, so an interrupted run never leaves a truncated checkpoint."""
    write_atomically(path, lambda stream: torch.save(checkpoint, stream), mode=OUTPUT_MODE)


def write_curves(out_dir: Path, history: list[dict]) -> None:
    """curves.csv and curves.png (loss, PSNR, SSIM per epoch) next to the checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=HISTORY_FIELDS)
    writer.writeheader()
    writer.writerows(history)
    write_atomically(out_dir / CURVES_CSV, table.getvalue().encode(), mode=OUTPUT_MODE)
    epochs = [row["epoch"] for row in history]
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.5), constrained_layout=True)
    axes[0].plot(epochs[1:], [row["train_loss"] for row in history[1:]], label="training")
    axes[0].plot(epochs, [row["val_loss"] for row in history], label="validation")
    axes[0].set(xlabel="epoch", ylabel="loss", yscale="log")
    axes[0].legend()
    axes[1].plot(epochs, [row["val_psnr"] for row in history])
    axes[1].set(xlabel="epoch", ylabel="validation PSNR (dB)")
    axes[2].plot(epochs, [row["val_ssim"] for row in history])
    axes[2].set(xlabel="epoch", ylabel="validation SSIM")
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=100)
    plt.close(figure)
    write_atomically(out_dir / CURVES_PNG, png.getvalue(), mode=OUTPUT_MODE)
