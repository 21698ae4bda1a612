"""Training pairs: full-dose raw images → breast patches → (simulated low dose, full dose), normalised.

Images come from a folder of full-dose raw MG DICOM files (each file's noise model from the node
configuration's detector entry for its Device Serial Number) or from the phantom generator.
Patch positions are drawn once per image, entirely inside the breast mask; the low-dose input is
made by the VST-domain dose simulation, once or anew every epoch. The full-dose target is the
noisy full-dose image itself, as in the seeds (there is no noise-free truth for clinical data).
The train/validation split is by image, so no validation patch shares an image with training.

One noise-correlation kernel (`data.noise_correlation`: the detector's own, white or a crosstalk
strength) serves both the phantoms' full-dose acquisitions and the injected low-dose noise, so the
low-dose input is correlated like its full-dose target. Phantoms are made at
`data.phantom_pixel_spacing_mm` (0.07 mm, the clinical pitch, unless the experiment says otherwise).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dicom_node.config import Config, load_config
from dicom_node.detectors import detector_noise, noise_model_for
from dicom_node.errors import ConfigurationError, InputRefused
from dicom_node.restore.blend import noise_level_maps
from dicom_node.restore.calibration import kernel_neighbour_correlations
from dicom_node.restore.gat import gat_forward
from dicom_node.restore.mask import breast_mask
from dicom_node.restore.noise import NoiseModel
from dicom_node.restore.normalisation import Normalisation
from dicom_node.sim.acquisition import acquire, crosstalk_kernel
from dicom_node.sim.dose import simulate_dose_reduction
from dicom_node.sim.phantom import make_phantom
from trainer.experiment import DataSettings

# The clinical detector pitch (mm) the models are meant for, and the phantoms' pitch before
# make_phantom's default became 0.2 mm (DataSettings.phantom_pixel_spacing_mm's default).
CLINICAL_PIXEL_SPACING_MM = 0.07
WHITE_KERNEL = np.ones((1, 1))  # a 1×1 kernel: white noise, whatever the detector's own kernel


def correlation_kernel(noise_correlation: float | None) -> np.ndarray | None:
    """The kernel `data.noise_correlation` stands for: None, the detector's own (the simulator's
    default, `noise.kernel`); 0, white (1×1); > 0, the 3×3 crosstalk kernel of that strength."""
    if noise_correlation is None:
        return None
    if noise_correlation == 0:
        return WHITE_KERNEL
    return crosstalk_kernel(noise_correlation)


def kernel_summary(noise_correlation: float | None, noises: list[NoiseModel]) -> dict:
    """The model card's record of the kernel: a label ("detector kernel", "white", "crosstalk S"),
    the setting, the kernel's size and the (vertical, horizontal) neighbour correlation of noise
    correlated by it; for the detector's kernel, the one of `noises` ("per image" when they differ)."""
    kernel: np.ndarray | None
    if noise_correlation is None:
        kernels = {None if n.kernel is None else np.asarray(n.kernel, dtype=np.float64).tobytes(): n for n in noises}
        if len(kernels) != 1:  # several detectors' kernels, or no image to read the detector's from
            return {
                "kernel": "detector kernel (per image)" if kernels else "detector kernel",
                "noise_correlation": None,
                "kernel_size": None,
                "neighbour_correlation": "per image" if kernels else None,
            }
        kernel = next(iter(kernels.values())).kernel
        label = "detector kernel" if kernel is not None else "detector kernel (none: white)"
    else:
        kernel = correlation_kernel(noise_correlation)
        label = "white" if noise_correlation == 0 else f"crosstalk {noise_correlation:g}"
    vertical, horizontal = kernel_neighbour_correlations(kernel)
    return {
        "kernel": label,
        "noise_correlation": noise_correlation,
        "kernel_size": [1, 1] if kernel is None else list(np.shape(kernel)),
        "neighbour_correlation": {"vertical": round(vertical, 4), "horizontal": round(horizontal, 4)},
    }


@dataclass
class TrainingImage:
    label: str  # where it came from: a file path or "phantom seed N"
    full_dose: np.ndarray  # raw, offset kept
    noise: NoiseModel
    mask: np.ndarray  # bool, the breast
    truth: np.ndarray | None = None  # the noise-free offset-free signal (phantoms only)


@dataclass
class ImagePatches:
    """The full-dose patches of one image and their noise model (a gain map cropped per patch)."""

    label: str
    full_dose: np.ndarray  # [patch, row, column] raw, float32 (exact for ≤ 24-bit integers; half the memory)
    noise: NoiseModel
    positions: np.ndarray  # [patch, (row, column)] top-left corners
    truth: np.ndarray | None = None  # [patch, row, column] noise-free signal, float32 (phantoms only)


def phantom_images(
    count: int,
    first_seed: int,
    shape: tuple[int, int],
    noise: NoiseModel,
    *,
    pixel_spacing_mm: float = CLINICAL_PIXEL_SPACING_MM,
    kernel: np.ndarray | None = None,
) -> list[TrainingImage]:
    """One full-dose acquisition of each of `count` phantoms (seeds first_seed, first_seed + 1, …)
    at `pixel_spacing_mm`, its quantum noise correlated by `kernel` (None: the detector's `noise.kernel`)."""
    images = []
    for seed in range(first_seed, first_seed + count):
        phantom = make_phantom(shape, seed=seed, pixel_spacing_mm=pixel_spacing_mm)
        rng = np.random.default_rng([seed, 1])
        full_dose = acquire(phantom.signal, noise, 1.0, rng, kernel=kernel).astype(np.float64)
        mask = breast_mask(full_dose, noise)
        images.append(TrainingImage(f"phantom seed {seed}", full_dose, noise, mask, phantom.signal))
    return images


def dicom_images(folder: Path, config: Config) -> list[TrainingImage]:
    """Every raw MG file under `folder` (sorted), with its detector's noise model from `config`.

    A file that is not a raw mammogram is refused (`InputRefused`); a detector without an entry
    in `config` is a `ConfigurationError` naming the entry to add.
    """
    from dicom_node.imaging import read_mammogram

    paths = sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith("."))
    if not paths:
        raise ConfigurationError(f"data.folder {folder}: no files found")
    images = []
    for path in paths:
        image = read_mammogram(path)  # InputRefused when the file is not a readable mammogram
        if not image.params.for_processing:
            raise InputRefused(f"{path}: not a raw (FOR PROCESSING) mammogram; train on raw data only")
        try:
            noise, _ = noise_model_for(config, image.params.detector_serial, image.pixels.shape)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{path}: {exc}") from None
        full_dose = image.pixels.astype(np.float64)
        images.append(TrainingImage(str(path), full_dose, noise, breast_mask(full_dose, noise)))
    return images


def load_images(settings: DataSettings) -> list[TrainingImage]:
    config = load_config(settings.node_config) if settings.node_config else load_config()
    if settings.source == "dicom":
        if settings.folder is None:  # DataSettings' validator already refuses this
            raise ConfigurationError('data: source = "dicom" needs folder')
        return dicom_images(settings.folder, config)
    try:
        noise = detector_noise(config, settings.detector)
    except ConfigurationError as exc:
        raise ConfigurationError(f"data.detector: {exc}") from None
    return phantom_images(
        settings.phantoms,
        settings.first_seed,
        settings.phantom_size,
        noise,
        pixel_spacing_mm=settings.phantom_pixel_spacing_mm,
        kernel=correlation_kernel(settings.noise_correlation),
    )


def split_by_image(
    images: list[TrainingImage], validation_images: int, seed: int
) -> tuple[list[TrainingImage], list[TrainingImage]]:
    """(training, validation): whole images held out, chosen by `seed`."""
    if not 0 < validation_images < len(images):
        raise ConfigurationError(
            f"data.validation_images: need 1 to {len(images) - 1} of {len(images)} images, got {validation_images}"
        )
    order = np.random.default_rng([seed, 2]).permutation(len(images))
    held_out = set(order[:validation_images].tolist())
    return (
        [img for i, img in enumerate(images) if i not in held_out],
        [img for i, img in enumerate(images) if i in held_out],
    )


def patch_positions(mask: np.ndarray, size: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` top-left corners of size×size patches lying entirely inside `mask` (with replacement
    only when there are fewer such positions than `count`)."""
    summed = np.pad(np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1), ((1, 0), (1, 0)))
    inside = summed[size:, size:] - summed[:-size, size:] - summed[size:, :-size] + summed[:-size, :-size]
    candidates = np.argwhere(inside == size * size)
    if not len(candidates):
        return np.empty((0, 2), dtype=np.int64)
    chosen = rng.choice(len(candidates), size=count, replace=count > len(candidates))
    return candidates[chosen]


def extract_patches(image: TrainingImage, size: int, count: int, rng: np.random.Generator) -> ImagePatches:
    positions = patch_positions(image.mask, size, count, rng)
    if not len(positions):
        raise InputRefused(f"{image.label}: the breast holds no {size}×{size} patch")
    rows = positions[:, 0, None, None] + np.arange(size)[None, :, None]
    cols = positions[:, 1, None, None] + np.arange(size)[None, None, :]
    gain = np.asarray(image.noise.gain, dtype=np.float64)
    patch_gain = gain if gain.ndim == 0 else gain[rows, cols]
    noise = NoiseModel(patch_gain, image.noise.electronic_noise, image.noise.offset, image.noise.kernel)
    truth = None if image.truth is None else image.truth[rows, cols].astype(np.float32)
    return ImagePatches(image.label, image.full_dose[rows, cols].astype(np.float32), noise, positions, truth)


def make_pairs(
    patches: list[ImagePatches],
    dose_fraction: float | list[float],
    normalisation: Normalisation,
    rng: np.random.Generator,
    noise_correlation: float | None = None,
    task: str = "restore",
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets), float32 [patch, 1, row, column]: simulated low dose and, normalised, the
    full dose (task "restore") or the noise-free GAT-domain expectation of the low dose ("denoise").

    The injected noise is correlated by `correlation_kernel(noise_correlation)`: None, each group's
    detector kernel (`noise.kernel`, white when it has none); 0, white; > 0, crosstalk. Several dose
    fractions (a denoiser's): one drawn per group (image)."""
    kernel = correlation_kernel(noise_correlation)
    doses = [dose_fraction] if isinstance(dose_fraction, float | int) else list(dose_fraction)
    inputs, targets = [], []
    for group in patches:
        dose_fraction = doses[int(rng.integers(len(doses)))] if len(doses) > 1 else doses[0]
        low_dose = simulate_dose_reduction(group.full_dose, group.noise, dose_fraction, rng, kernel)
        inputs.append(normalisation.to_network(low_dose, group.noise, dose_fraction))
        if task == "denoise":
            if group.truth is None:
                raise ConfigurationError(f"{group.label}: a denoiser is trained against the truth (phantoms only)")
            targets.append(normalisation.clean_target(group.truth, group.noise, dose_fraction))
        else:
            targets.append(normalisation.target(group.full_dose, group.noise))
    return np.concatenate(inputs)[:, None], np.concatenate(targets)[:, None]


# Channels of the packed targets of `acquired_pairs`: what the "protocol" loss needs besides the
# network's own target (channel 0), per pixel: truth (full dose, offset-free), the low-dose input
# (offset-free), λ, σ_e², r.
PACKED_TARGETS = ("target", "truth", "low_dose", "gain", "electronic_variance", "dose_fraction")


def acquired_pairs(
    patches: list[ImagePatches], settings: DataSettings, normalisation: Normalisation, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of `low_dose_from = "truth"`, float32 [patch × realisation, channel, row, column].

    Every patch gets its own dose (one of the settings' fractions), detector (drawn from
    `detector_ranges`, else its image's) and noise correlation (3×3 crosstalk drawn from
    `crosstalk_range`, else `noise_correlation`'s kernel, else the detector's), then
    `realisations` acquisitions of its truth, consecutive. Inputs: the GAT image (normalised) and,
    with `noise_level_maps`, its maps. Targets (`PACKED_TARGETS`): the exact GAT-domain expectation
    (normalised; what a denoiser should output) and the physics the protocol loss needs.
    """
    doses = [settings.dose_fraction, *settings.extra_dose_fractions]
    inputs, targets = [], []
    for group in patches:
        if group.truth is None:
            raise ConfigurationError(f'{group.label}: low_dose_from = "truth" needs the truth (phantoms only)')
        for truth in group.truth.astype(np.float64):
            noise = _drawn_noise(group.noise, settings, rng)
            dose = doses[int(rng.integers(len(doses)))]
            target = normalisation.clean_target(truth, noise, dose)
            constants = [np.full(truth.shape, value) for value in (noise.gain, noise.electronic_noise**2, dose)]
            for _ in range(settings.realisations):
                low_dose = acquire(truth, noise, dose, rng).astype(np.float64)
                channels = [normalisation.to_network(low_dose, noise, dose)]
                if settings.noise_level_maps:
                    channels.extend(noise_level_maps(gat_forward(low_dose, noise), noise, dose))
                inputs.append(np.stack(channels))
                targets.append(np.stack([target, truth, low_dose - noise.offset, *constants]))
    return np.asarray(inputs, dtype=np.float32), np.asarray(targets, dtype=np.float32)


def _drawn_noise(noise: NoiseModel, settings: DataSettings, rng: np.random.Generator) -> NoiseModel:
    """A patch's detector: λ, σ_e, τ from `detector_ranges` (else the image's), with its kernel."""
    kernel: np.ndarray | None
    if settings.crosstalk_range is not None:
        kernel = crosstalk_kernel(float(rng.uniform(*settings.crosstalk_range)))
    else:
        kernel = correlation_kernel(settings.noise_correlation)
        kernel = noise.kernel if kernel is None else kernel
    if kernel is not None and kernel.shape == (1, 1):
        kernel = None  # white
    ranges = settings.detector_ranges
    if ranges is None:
        return NoiseModel(noise.gain, noise.electronic_noise, noise.offset, kernel)
    gain, electronic, offset = (float(rng.uniform(*r)) for r in (ranges.gain, ranges.electronic_noise, ranges.offset))
    return NoiseModel(gain, electronic, offset, kernel)


def inputs_digest(images: list[TrainingImage]) -> str:
    """sha256 of the list of training inputs: each image's label and pixel digest, one per line."""
    lines = (
        f"{img.label}\t{hashlib.sha256(np.ascontiguousarray(img.full_dose).tobytes()).hexdigest()}" for img in images
    )
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


class PatchData:
    """Training and validation patches of an experiment; `training_pairs(epoch)` gives an epoch's pairs."""

    def __init__(self, settings: DataSettings, seed: int, images: list[TrainingImage] | None = None) -> None:
        self.settings = settings
        self.seed = seed
        self.normalisation = settings.normalisation.build()
        images = load_images(settings) if images is None else images
        train, validation = split_by_image(images, settings.validation_images, seed)
        self.train_images, self.validation_images = train, validation
        self.train = [self._patches(img, i) for i, img in enumerate(train)]
        self.validation = [self._patches(img, len(train) + i) for i, img in enumerate(validation)]
        self.validation_pairs = self._pairs(self.validation, np.random.default_rng([seed, 4]))
        self._fixed_training_pairs: tuple[np.ndarray, np.ndarray] | None = None

    def _patches(self, image: TrainingImage, index: int) -> ImagePatches:
        rng = np.random.default_rng([self.seed, 3, index])
        return extract_patches(image, self.settings.patch_size, self.settings.patches_per_image, rng)

    def _pairs(self, patches: list[ImagePatches], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        s = self.settings
        if s.low_dose_from == "truth":
            return acquired_pairs(patches, s, self.normalisation, rng)
        doses = [s.dose_fraction, *s.extra_dose_fractions]
        return make_pairs(patches, doses, self.normalisation, rng, s.noise_correlation, s.task)

    def training_pairs(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """New low-dose noise for every epoch when `resimulate`, else the same pairs each epoch."""
        if self.settings.resimulate:
            return self._pairs(self.train, np.random.default_rng([self.seed, 5, epoch]))
        if self._fixed_training_pairs is None:
            self._fixed_training_pairs = self._pairs(self.train, np.random.default_rng([self.seed, 5]))
        return self._fixed_training_pairs

    def summary(self) -> dict:
        """The model card's training_data: count, source and a digest of the training inputs."""
        s = self.settings
        if s.source == "phantom":
            source = (
                f"synthetic phantoms, seeds {s.first_seed}..{s.first_seed + s.phantoms - 1}, "
                f"{s.phantom_size[0]}x{s.phantom_size[1]} at {s.phantom_pixel_spacing_mm:g} mm, detector {s.detector}"
            )
        else:
            source = f"full-dose raw MG DICOM files in {s.folder}"
        return {
            "phantom_pixel_spacing_mm": s.phantom_pixel_spacing_mm if s.source == "phantom" else None,
            # the kernel of the phantoms' full-dose noise (DICOM files come with their own)
            "full_dose_noise_kernel": self.kernel_summary()["kernel"] if s.source == "phantom" else "as acquired",
            "count": len(self.train_images),
            "validation_count": len(self.validation_images),
            "patches": sum(len(p.full_dose) for p in self.train),
            "patch_size": s.patch_size,
            "source": source,
            "training_inputs": [img.label for img in self.train_images],
            "validation_inputs": [img.label for img in self.validation_images],
            "digest": inputs_digest(self.train_images),
        }

    def kernel_summary(self) -> dict:
        """The model card's record of the noise-correlation kernel (`kernel_summary`); with a crosstalk
        range or noise-level maps, also the range of mean neighbour correlations trained on."""
        s = self.settings
        if s.crosstalk_range is not None:
            low, high = (float(np.mean(kernel_neighbour_correlations(crosstalk_kernel(c)))) for c in s.crosstalk_range)
            return {
                "kernel": f"crosstalk {s.crosstalk_range[0]:g} to {s.crosstalk_range[1]:g}, drawn per patch",
                "noise_correlation": None,
                "kernel_size": [3, 3],
                "neighbour_correlation": {"lowest": round(low, 4), "highest": round(high, 4)},
            }
        images = self.train_images + self.validation_images
        summary = kernel_summary(s.noise_correlation, [img.noise for img in images])
        correlation = summary["neighbour_correlation"]
        if s.noise_level_maps and isinstance(correlation, dict):
            mean = round((correlation["vertical"] + correlation["horizontal"]) / 2, 4)
            summary["neighbour_correlation"] = {**correlation, "lowest": mean, "highest": mean}
        return summary

    def noise_summary(self) -> dict:
        """The model card's noise_model: the one used, or a note when the images had several."""
        models = {(_describe_gain(i.noise.gain), i.noise.electronic_noise, i.noise.offset) for i in self.train_images}
        if len(models) == 1:
            gain, electronic, offset = models.pop()
            return {"gain": gain, "electronic_noise": electronic, "offset": offset}
        return {
            "note": f"per image, from the detector entries of {self.settings.node_config or 'the embedded defaults'}"
        }


def _describe_gain(gain: float | np.ndarray) -> float | str:
    return float(gain) if np.ndim(gain) == 0 else "per-pixel map"
