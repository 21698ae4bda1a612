"""One experiment = one TOML file: data, network, loss and optimiser settings, validated by pydantic.

A wrong key or value becomes a `ConfigurationError` whose text is one line naming the key, like
the node's own configuration. Relative paths in the file are relative to the file's folder.
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dicom_node.config import describe_validation_error
from dicom_node.errors import ConfigurationError
from dicom_node.restore.blend import NOISE_LEVEL_MAPS
from dicom_node.restore.normalisation import Normalisation


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NetworkSettings(_Strict):
    name: str  # a name of dicom_node.restore.networks.network_names()
    options: dict[str, Any] = {}  # constructor options (empty: the paper's settings)


class NormalisationSettings(_Strict):
    domain: Literal["raw", "anscombe"] = "raw"
    scale: float = Field(default=8000.0, gt=0)

    def build(self) -> Normalisation:
        return Normalisation(self.domain, self.scale)


class DetectorRanges(_Strict):
    """Ranges a detector is drawn from, uniformly, per training patch (λ, σ_e, τ of `NoiseModel`)."""

    gain: tuple[float, float]
    electronic_noise: tuple[float, float]
    offset: tuple[float, float]

    @model_validator(mode="after")
    def _ordered(self) -> DetectorRanges:
        for name in ("gain", "electronic_noise", "offset"):
            low, high = getattr(self, name)
            if not 0 <= low <= high or (name == "gain" and low == 0):
                raise ValueError(
                    f"{name} must be a range [low, high] with 0 {'<' if name == 'gain' else '≤'} low ≤ high"
                )
        return self


class DataSettings(_Strict):
    # "restore": the network maps a low-dose image to a full-dose one (the deep restorer).
    # "denoise": it maps the GAT of a low-dose image (noise std 1) to its noise-free GAT-domain
    # expectation: the denoiser inside the model-based path (gat-bm3d, denoiser = "network"), whose
    # blend then puts back full-dose noise. Needs the truth, so phantoms only, and the anscombe domain.
    task: Literal["restore", "denoise"] = "restore"
    source: Literal["phantom", "dicom"] = "phantom"
    # source = "phantom": synthetic phantoms with seeds first_seed, first_seed + 1, …
    phantoms: int = Field(default=16, ge=2)
    first_seed: int = Field(default=0, ge=0)
    phantom_size: tuple[int, int] = (512, 416)
    # Detector pitch of the phantoms (mm). 0.07 mm is the clinical (Hologic-like) pitch the models are
    # meant for, and the pitch the phantoms had before make_phantom's default became 0.2 mm: existing
    # experiments and the shipped model's recipe keep training on the same data.
    phantom_pixel_spacing_mm: float = Field(default=0.07, gt=0)
    detector: str = "SIM-0001"  # the node-config detector entry whose noise the phantoms get
    # source = "dicom": full-dose raw MG files; each file's noise from its Device Serial Number
    folder: Path | None = None
    node_config: Path | None = None  # node configuration with [detectors]; None: embedded defaults
    dose_fraction: float = Field(gt=0, lt=1)
    # task = "denoise" only: more dose fractions to simulate, one drawn per image and epoch (a GAT-domain
    # denoiser sees noise of std 1 whatever the dose; the dose sets the signal-to-noise it learns at)
    extra_dose_fractions: list[float] = []
    # The noise-correlation kernel, the same for the phantoms' full-dose acquisitions and the injected
    # low-dose noise: None, the detector's own kernel (its noise model's `kernel`; white when it has
    # none); 0, white; > 0, the 3×3 crosstalk kernel of that strength (dicom_node.sim.acquisition).
    noise_correlation: float | None = Field(default=None, ge=0, le=1)
    # task = "denoise": where the low-dose input comes from. "full-dose": the VST dose reduction of the
    # phantom's full-dose acquisition (as it must be for clinical data). "truth": acquired anew from
    # the phantom's noise-free signal, every patch with its own draw of dose, detector and crosstalk:
    # what several noise realisations of one patch need (the protocol loss measures noise and bias
    # over them; realisations of a dose reduction would share the full dose's noise as "bias").
    low_dose_from: Literal["full-dose", "truth"] = "full-dose"
    realisations: int = Field(default=1, ge=1)  # noise realisations per patch, consecutive in every batch
    detector_ranges: DetectorRanges | None = None  # λ, σ_e, τ drawn per patch (low_dose_from = "truth")
    crosstalk_range: tuple[float, float] | None = None  # 3×3 crosstalk strength drawn per patch (idem)
    # add the noise-level maps (dicom_node.restore.blend.noise_level_maps) as input channels: the
    # network then needs options.conditions = 2 and serves every dose and detector it was trained on
    noise_level_maps: bool = False
    resimulate: bool = False  # new low-dose noise every epoch (seed 001)
    patch_size: int = Field(default=64, ge=8)
    patches_per_image: int = Field(default=256, ge=1)
    validation_images: int = Field(default=2, ge=1)  # whole images held out: the split is by image, never by patch
    normalisation: NormalisationSettings = NormalisationSettings()

    @model_validator(mode="after")
    def _source_complete(self) -> DataSettings:
        if self.source == "dicom" and self.folder is None:
            raise ValueError('source = "dicom" needs folder')
        if self.task == "denoise" and (self.source != "phantom" or self.normalisation.domain != "anscombe"):
            raise ValueError('task = "denoise" needs source = "phantom" (the noise-free truth) and the anscombe domain')
        if self.extra_dose_fractions and self.task != "denoise":
            raise ValueError('extra_dose_fractions is for task = "denoise" (a restoring model is made for one dose)')
        if any(not 0 < d < 1 for d in self.extra_dose_fractions):
            raise ValueError("extra_dose_fractions must lie in (0, 1)")
        if self.low_dose_from == "truth" and self.task != "denoise":
            raise ValueError('low_dose_from = "truth" is for task = "denoise" (phantoms, against their truth)')
        drawn = self.realisations > 1 or self.detector_ranges or self.crosstalk_range or self.noise_level_maps
        if drawn and self.low_dose_from != "truth":
            raise ValueError(
                'realisations, detector_ranges, crosstalk_range and noise_level_maps need low_dose_from = "truth"'
            )
        if self.crosstalk_range is not None:
            low, high = self.crosstalk_range
            if not 0 <= low <= high <= 1:
                raise ValueError("crosstalk_range must be [low, high] with 0 ≤ low ≤ high ≤ 1")
            if self.noise_correlation is not None:
                raise ValueError("give noise_correlation or crosstalk_range, not both")
        if self.source == "phantom":
            if self.validation_images >= self.phantoms:
                raise ValueError(
                    f"validation_images ({self.validation_images}) must be fewer than phantoms ({self.phantoms})"
                )
            if min(self.phantom_size) < 2 * self.patch_size:
                raise ValueError(f"phantom_size must be at least twice patch_size ({self.patch_size}) a side")
        return self


class TrainingSettings(_Strict):
    epochs: int = Field(default=60, ge=1)
    batch_size: int = Field(default=256, ge=1)
    learning_rate: float = Field(default=1e-4, gt=0)
    betas: tuple[float, float] = (0.5, 0.999)
    lr_halving_epochs: int = Field(default=10, ge=1)  # the learning rate halves every this many epochs
    loss: str | dict[str, float] = "mae"  # a make_loss spec: "mse", "pl4", {"mse" = 1, "ssim" = 10}, "protocol", …
    rn_weight: float = Field(default=1.0, gt=0)  # the "protocol" loss's weight on |RN − RN_FD|
    vgg_weights: Path | None = None  # torchvision's vgg16 state dict, for the perceptual losses
    identity_start: bool = False  # zero the output convolution: a residual network starts as the identity
    init_from: Path | None = None  # a checkpoint (.pt) or an exported model (.safetensors) to start from
    init_prefix: str = ""  # load init_from into this submodule (e.g. "first." of a cascade)
    # parameter-name prefixes init_from may lack; they keep their initialisation (e.g. the zeroed
    # "condition." branch of a conditioned DnCNN started from an unconditioned one)
    init_missing: list[str] = []
    freeze: list[str] = []  # parameter-name prefixes kept fixed (e.g. a cascade's trained first stage)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(default=None, ge=1)  # CPU threads for torch; None: torch's default


class Experiment(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    seed: int = Field(default=0, ge=0)
    notes: str = ""  # copied to the model card (e.g. why a width differs from the paper)
    network: NetworkSettings
    data: DataSettings
    training: TrainingSettings = TrainingSettings()

    @model_validator(mode="after")
    def _fits_together(self) -> Experiment:
        realisations = self.data.realisations
        if self.training.batch_size % realisations:
            raise ValueError(f"training.batch_size must be a multiple of data.realisations ({realisations})")
        if "protocol" in loss_names(self.training.loss) and realisations < 2:
            raise ValueError('loss "protocol" measures noise over realisations: data.realisations must be 2 or more')
        conditions = self.network.options.get("conditions", 0)
        if conditions != (NOISE_LEVEL_MAPS if self.data.noise_level_maps else 0):
            raise ValueError(
                f"network.options.conditions must be {NOISE_LEVEL_MAPS} with data.noise_level_maps, else 0 (got {conditions})"
            )
        return self

    def resolved(self, base: Path) -> Experiment:
        """The same experiment with its relative paths made relative to `base`."""

        def fix(path: Path | None) -> Path | None:
            return path if path is None or path.is_absolute() else base / path

        data = self.data.model_copy(update={"folder": fix(self.data.folder), "node_config": fix(self.data.node_config)})
        training = self.training.model_copy(
            update={"vgg_weights": fix(self.training.vgg_weights), "init_from": fix(self.training.init_from)}
        )
        return self.model_copy(update={"data": data, "training": training})


def loss_names(spec: str | dict[str, float]) -> set[str]:
    return {spec} if isinstance(spec, str) else set(spec)


def parse_experiment(data: dict, where: str = "experiment") -> Experiment:
    try:
        return Experiment.model_validate(data)
    except ValidationError as exc:
        raise ConfigurationError(f"{where}: {describe_validation_error(exc)}") from None


def apply_override(data: dict, assignment: str) -> dict:
    """`section.key=value` (value in TOML syntax, else taken as a string) applied to a copy of `data`."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigurationError(f"--set needs KEY=VALUE, got {assignment!r}")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    result = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    *sections, leaf = key.strip().split(".")
    node = result
    for section in sections:
        child = node.get(section, {})
        if not isinstance(child, dict):
            raise ConfigurationError(f"--set {key}: {section} is not a section")
        node[section] = child = dict(child)
        node = child
    node[leaf] = value
    return result


def load_experiment(path: str | Path, overrides: Sequence[str] = ()) -> Experiment:
    """Read an experiment TOML file, apply `--set` overrides, validate, resolve relative paths."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigurationError(f"cannot read experiment {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{path}: not valid TOML: {exc}") from None
    for assignment in overrides:
        data = apply_override(data, assignment)
    return parse_experiment(data, str(path)).resolved(path.resolve().parent)
