"""The deep restoration path: tiled inference, model files and cards, the `deep` restorer.

The networks here are tiny, randomly initialised versions of the registry's networks (plus a
stand-in module, to show that any module with a `receptive_field_radius` works), with random
batch-norm statistics: the tests check the plumbing, not a trained model's image quality.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from dicom_node.errors import ConfigurationError
from dicom_node.restore.deep import DeepRestorer, ModelCard, load_model, resolve_model, tiled_inference
from dicom_node.restore.deep import store as deep
from dicom_node.restore.networks import build_network
from dicom_node.restore.noise import NoiseModel
from dicom_node.restore.normalisation import Normalisation
from dicom_node.restore.registry import Environment, create_restorer
from dicom_node.sim.acquisition import acquire
from dicom_node.sim.phantom import make_phantom

NOISE = NoiseModel(0.1, 3.0, 50.0)


class StandIn(nn.Module):
    """`layers` 3×3 convolutions (zero padding) → receptive-field radius = layers; learns a residual."""

    def __init__(self, features: int = 6, layers: int = 4, claimed_radius: int | None = None) -> None:
        super().__init__()
        body: list[nn.Module] = [nn.Conv2d(1, features, 3, padding=1), nn.ReLU()]
        for _ in range(layers - 2):
            body += [nn.Conv2d(features, features, 3, padding=1, bias=False), nn.BatchNorm2d(features), nn.ReLU()]
        body.append(nn.Conv2d(features, 1, 3, padding=1))
        self.body = nn.Sequential(*body)
        self.receptive_field_radius = layers if claimed_radius is None else claimed_radius

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def randomised(net: nn.Module, seed: int) -> nn.Module:
    """`net` in eval mode with random batch-norm statistics (fresh ones are the identity)."""
    generator = torch.Generator().manual_seed(seed)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(0.4 * torch.rand(module.num_features, generator=generator) - 0.2)
            module.running_var.copy_(0.5 + 1.5 * torch.rand(module.num_features, generator=generator))
    return net.eval()


def standin(seed: int = 0, **options) -> StandIn:
    torch.manual_seed(seed)
    return randomised(StandIn(**options), seed)


TINY = {"network": "dncnn", "network_options": {"features": 6, "layers": 4}}


def tiny(seed: int = 0, network: str = TINY["network"], **options) -> nn.Module:
    """A small registry network, randomly initialised from `seed`."""
    torch.manual_seed(seed)
    return randomised(build_network(network, **(options or TINY["network_options"])), seed)


def identity() -> nn.Module:
    """Tiny DnCNN whose noise estimate is zero (last convolution zero, no bias): it returns its input."""
    net = tiny()
    nn.init.zeros_(net.noise[-1].weight)
    return net


def untiled(net: nn.Module, image: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return net(torch.from_numpy(image[None, None].astype(np.float32)))[0, 0].numpy()


def save_model(model_dir: Path, name: str, net: nn.Module, dose_fraction: float = 0.5, **card) -> dict:
    """Weights as safetensors + a model card, as `trainer export` writes them."""
    model_dir.mkdir(parents=True, exist_ok=True)
    weights = model_dir / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, weights)
    card = {
        "name": name,
        **TINY,
        "loss": "mse",
        "dose_fraction": dose_fraction,
        "normalisation": Normalisation("raw", 1000.0).to_dict(),
        "weights_sha256": deep.file_sha256(weights),
        "synthetic_only": True,
        "created": "2025-01-01T00:00:00+00:00",
        **card,
    }
    (model_dir / f"{name}.json").write_text(json.dumps(card))
    return card


@pytest.fixture
def loads(monkeypatch):
    """Names of the models read from disk (not served from the restorer's cache)."""
    names = []
    load = deep.load_model

    def counting(model_dir, name):
        names.append(name)
        return load(model_dir, name)

    monkeypatch.setattr(deep, "load_model", counting)
    deep._cached_model.cache_clear()
    return names


# --- tiled inference -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, tile, margin, batch",
    [
        ((97, 131), 32, None, 3),  # odd sizes, not multiples of the tile
        ((64, 64), 20, 5, 1),  # a margin above the radius, one tile per batch
        ((50, 203), 64, 10, 4),  # one axis fits in a tile, the other does not
        ((33, 17), 512, None, 4),  # the whole image in one tile
        ((129, 77), 9, 4, 16),  # the smallest tile: a 1-px core
    ],
)
def test_tiled_equals_untiled(shape, tile, margin, batch):
    net = standin(layers=4)
    image = np.random.default_rng(1).normal(0.5, 0.2, shape).astype(np.float32)
    expected = untiled(net, image)
    result = tiled_inference(net, image, tile=tile, margin=margin, batch=batch)
    difference = float(np.max(np.abs(result - expected)))
    print(f"{shape} tile {tile} margin {margin} batch {batch}: max |tiled − untiled| = {difference:.2e}")
    assert result.shape == shape and result.dtype == np.float32
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "network, options",
    [
        ("hresnet", {"features": 4, "blocks": 2}),
        ("resnet-at", {"features": 4, "blocks": 2}),
        ("dncnn", {"features": 4, "layers": 5}),
        ("cnn5", {"features": 4}),
        (
            "cascade",
            {
                "first": "cnn5",
                "first_options": {"features": 4},
                "second": "hresnet",
                "second_options": {"features": 4, "blocks": 2},
            },
        ),
    ],
)
def test_tiled_equals_untiled_for_every_network(network, options):
    net = tiny(4, network, **options)
    image = np.random.default_rng(4).normal(0.5, 0.2, (91, 67)).astype(np.float32)
    tile = 2 * net.receptive_field_radius + 9
    result = tiled_inference(net, image, tile=tile, batch=5)
    difference = float(np.max(np.abs(result - untiled(net, image))))
    print(f"{network}: radius {net.receptive_field_radius}, tile {tile}: max |tiled − untiled| = {difference:.2e}")
    np.testing.assert_allclose(result, untiled(net, image), rtol=1e-5, atol=1e-6)


def test_a_margin_below_the_true_radius_shows_seams():
    """The equality test can fail: a network that under-states its radius gets a too-small margin."""
    net = standin(layers=4, claimed_radius=1)
    image = np.random.default_rng(2).normal(0.5, 0.2, (80, 80)).astype(np.float32)
    difference = float(np.max(np.abs(tiled_inference(net, image, tile=24) - untiled(net, image))))
    print(f"margin 1 for a radius-4 network: max |tiled − untiled| = {difference:.2e}")
    assert difference > 1e-3


def test_margin_below_the_radius_and_tiny_tiles_are_refused():
    net = standin(layers=4)
    image = np.zeros((40, 40), np.float32)
    with pytest.raises(ValueError, match="margin 3 px is below the network's receptive-field radius 4"):
        tiled_inference(net, image, margin=3)
    with pytest.raises(ValueError, match="tile 8 px leaves nothing"):
        tiled_inference(net, image, tile=8)


# --- model files -----------------------------------------------------------------------------


def test_saved_model_loads_and_gives_identical_output(tmp_path):
    net = tiny(seed=3)
    card = save_model(tmp_path, "tiny", net)
    loaded, loaded_card = load_model(tmp_path, "tiny")
    assert loaded_card == ModelCard.from_dict(card) and not loaded.training and loaded is not net
    assert loaded_card.weights_sha256 == card["weights_sha256"] and loaded_card.dose_fraction == 0.5
    image = np.random.default_rng(3).normal(0.5, 0.2, (45, 38)).astype(np.float32)
    np.testing.assert_array_equal(untiled(loaded, image), untiled(net, image))


def test_changed_weights_are_refused(tmp_path):
    save_model(tmp_path, "tiny", tiny(seed=3))
    save_file({k: v.contiguous() for k, v in tiny(seed=4).state_dict().items()}, tmp_path / "tiny.safetensors")
    with pytest.raises(ConfigurationError, match="weights of model 'tiny' do not match its card"):
        load_model(tmp_path, "tiny")


def test_missing_model_bad_card_and_unknown_network_are_refused(tmp_path):
    with pytest.raises(ConfigurationError, match="no model 'absent'"):
        load_model(tmp_path, "absent")
    save_model(tmp_path, "strange", tiny(), network="nonet")
    with pytest.raises(ConfigurationError, match="unknown network 'nonet'.*hresnet"):
        load_model(tmp_path, "strange")
    save_model(tmp_path, "wide", tiny(), network_options={"features": 8, "layers": 4})
    with pytest.raises(ConfigurationError, match="do not fit network 'dncnn'"):
        load_model(tmp_path, "wide")
    save_model(tmp_path, "misnamed", tiny(), network_options={"channels": 6})
    with pytest.raises(ConfigurationError, match="bad options for network 'dncnn'"):
        load_model(tmp_path, "misnamed")
    card = save_model(tmp_path, "partial", tiny())
    del card["weights_sha256"]
    (tmp_path / "partial.json").write_text(json.dumps(card))
    with pytest.raises(ConfigurationError, match="lacks weights_sha256"):
        load_model(tmp_path, "partial")
    (tmp_path / "partial.json").write_text("{not json")
    with pytest.raises(ConfigurationError, match="not valid JSON"):
        load_model(tmp_path, "partial")
    for bad, message in (
        ([1, 2], "must hold a JSON object"),
        ({**card, "weights_sha256": "0", "network_options": [6]}, "network_options must be an object"),
        ({**card, "weights_sha256": "0", "normalisation": {"domain": "log"}}, "unknown normalisation domain 'log'"),
        ({**card, "weights_sha256": "0", "dose_fraction": "half"}, "could not convert"),
    ):
        (tmp_path / "partial.json").write_text(json.dumps(bad))
        with pytest.raises(ConfigurationError, match=message):
            load_model(tmp_path, "partial")
    save_model(tmp_path, "orphan", tiny())
    (tmp_path / "orphan.safetensors").unlink()
    with pytest.raises(ConfigurationError, match="no weights file"):
        load_model(tmp_path, "orphan")


def test_the_shipped_card_loads_and_a_card_round_trips(tmp_path):
    shipped = deep.SHIPPED_MODEL_DIR / "hresnet-phantom-50.json"
    card = deep.read_card(deep.SHIPPED_MODEL_DIR, "hresnet-phantom-50")
    assert card.network == "hresnet" and card.dose_fraction == 0.5 and card.extra == {}
    assert card.normaliser == Normalisation("raw", 8000.0)
    assert card.to_json() == json.dumps(json.loads(shipped.read_text()), indent=2) + "\n"  # every field, in order
    written = card.write(tmp_path / "copy.json")
    assert written.stat().st_mode & 0o777 == 0o644
    assert ModelCard.read(written) == card
    newer = {**card.to_dict(), "calibration": {"kind": "future"}}  # a key this version does not know
    assert ModelCard.from_dict(newer).to_dict() == newer
    with pytest.raises(ConfigurationError, match="model card .*absent.json does not exist"):
        ModelCard.read(tmp_path / "absent.json")


def test_default_model_is_the_newest_for_the_dose_fraction(tmp_path):
    save_model(tmp_path, "half-old", tiny(), 0.5, created="2024-05-01T10:00:00+00:00")
    save_model(tmp_path, "half-new", tiny(), 0.5, created="2025-03-01T10:00:00+00:00")
    save_model(tmp_path, "quarter", tiny(), 0.25)
    assert resolve_model(tmp_path, None, 0.5) == "half-new"
    assert resolve_model(tmp_path, None, 0.25) == "quarter"
    assert resolve_model(tmp_path, "half-old", 0.5) == "half-old"
    with pytest.raises(
        ConfigurationError,
        match=r"no default model for dose fraction 0.3 .*available: 0.5 \(half-new\), 0.5 \(half-old\), 0.25 \(quarter\)",
    ):
        resolve_model(tmp_path, None, 0.3)
    with pytest.raises(ConfigurationError, match="no model 'other'"):
        resolve_model(tmp_path, "other", 0.5)
    with pytest.raises(ConfigurationError, match="model directory .* does not exist"):
        resolve_model(tmp_path / "missing", None, 0.5)


def test_a_denoiser_serves_every_dose_it_was_trained_at(tmp_path):
    """The deep restorer looks among both tasks: a denoiser trained at 0.5 and 0.25 is the default
    for both when newest; restoring models keep their one dose; gat-bm3d's network only denoisers."""
    save_model(tmp_path, "half", tiny(), 0.5, created="2025-01-01T00:00:00+00:00")
    both = {"dose_fractions": [0.5, 0.25]}
    save_model(
        tmp_path, "denoiser", tiny(), 0.5, task="denoise", noise_simulation=both, created="2025-06-01T00:00:00+00:00"
    )
    assert deep.read_card(tmp_path, "denoiser").dose_fractions == [0.5, 0.25]
    assert deep.read_card(tmp_path, "half").dose_fractions == [0.5]
    tasks = ("restore", "denoise")
    assert resolve_model(tmp_path, None, 0.5, tasks) == resolve_model(tmp_path, None, 0.25, tasks) == "denoiser"
    assert resolve_model(tmp_path, None, 0.5) == "half"
    with pytest.raises(ConfigurationError, match=r"available: 0.5 \(half\)"):
        resolve_model(tmp_path, None, 0.25)
    with pytest.raises(ConfigurationError, match=r"dose fraction 0.1 .*available: 0.5/0.25 \(denoiser\), 0.5 \(half\)"):
        resolve_model(tmp_path, None, 0.1, tasks)


# --- the restorer ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def half_dose():
    phantom = make_phantom((96, 80), seed=5)
    return acquire(phantom.signal, NOISE, 0.5, rng_or_seed=6).astype(np.float64)


def test_identity_network_gives_the_linear_rescale(tmp_path, half_dose):
    validation = {"psnr": 41.5, "ssim": 0.93, "loss": 0.01, "epoch": 12, "low_dose_input": None}
    card = save_model(tmp_path, "identity", identity(), validation=validation)
    restorer = create_restorer("deep", Environment(device="cpu", model_dir=tmp_path), model="identity", tile=32)
    assert isinstance(restorer, DeepRestorer) and restorer.name == "deep"
    assert restorer.device == "cpu"
    restoration = restorer.restore(half_dose, NOISE, 0.5)
    assert restoration.provenance.model_name == "identity"
    assert restoration.provenance.model_digest == card["weights_sha256"]
    expected = (half_dose - NOISE.offset) / 0.5 + NOISE.offset
    print("qc:", restoration.qc, "timings:", restoration.timings)
    np.testing.assert_allclose(restoration.image, expected, rtol=1e-5, atol=1e-3)
    assert restoration.image.dtype == np.float64
    assert restoration.qc["mean_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert restoration.qc["dose_fraction_mismatch"] == 0.0
    assert 0.2 < restoration.qc["breast_fraction"] < 0.95
    # the card's validation figures travel with each job (the epoch and non-numbers do not)
    validated = {key: value for key, value in restoration.qc.items() if key.startswith("model_validation_")}
    assert validated == {"model_validation_psnr": 41.5, "model_validation_ssim": 0.93, "model_validation_loss": 0.01}
    assert set(restoration.timings) == {"load", "normalise", "inference", "denormalise", "qc", "total"}


def test_tiles_do_not_change_the_restoration(tmp_path, half_dose):
    save_model(tmp_path, "tiny", tiny(seed=7))
    whole = DeepRestorer("tiny", tmp_path).restore(half_dose, NOISE, 0.5).image
    tiled = DeepRestorer("tiny", tmp_path, tile=24, batch=3).restore(half_dose, NOISE, 0.5).image
    assert whole.shape == half_dose.shape and np.all(np.isfinite(whole))
    assert np.max(np.abs(whole - (half_dose - NOISE.offset) / 0.5 - NOISE.offset)) > 1.0  # the network did act
    np.testing.assert_allclose(tiled, whole, rtol=1e-5, atol=1e-2)


def test_default_model_from_the_environment_and_loaded_once(tmp_path, half_dose, monkeypatch, loads):
    save_model(tmp_path, "half", identity(), 0.5)
    save_model(tmp_path, "quarter", tiny(), 0.25)
    monkeypatch.setenv(deep.MODEL_DIR_VARIABLE, str(tmp_path))
    restorer = DeepRestorer()
    assert restorer.model_dir == tmp_path and restorer.model is None and loads == []
    provenance = restorer.restore(half_dose, NOISE, 0.5).provenance
    assert provenance.model_name == "half"
    assert provenance.model_digest == deep.file_sha256(tmp_path / "half.safetensors")
    assert restorer.restore(half_dose, NOISE, 0.25).provenance.model_name == "quarter"
    DeepRestorer().restore(half_dose, NOISE, 0.5)
    assert loads == ["half", "quarter"]  # each model was read once
    with pytest.raises(
        ConfigurationError,
        match="no default model for dose fraction 0.1 .*available: 0.5 \\(half\\), 0.25 \\(quarter\\)",
    ):
        restorer.restore(half_dose, NOISE, 0.1)
    monkeypatch.delenv(deep.MODEL_DIR_VARIABLE)
    assert DeepRestorer().model_dir == deep.SHIPPED_MODEL_DIR == Path(deep.__file__).parents[2] / "models"


def test_a_model_for_another_dose_fraction_is_refused(tmp_path, half_dose):
    save_model(tmp_path, "half", identity(), 0.5)
    with pytest.raises(ConfigurationError, match="model 'half' was trained for dose fraction 0.5, not 0.25"):
        DeepRestorer("half", tmp_path).restore(half_dose, NOISE, 0.25)
    with pytest.raises(ConfigurationError, match="unknown device 'tpu'"):
        DeepRestorer("half", tmp_path, device="tpu")


def test_registering_the_deep_restorer_does_not_import_torch():
    code = (
        "import sys\n"
        "from dicom_node.restore.registry import restorer_names\n"
        "print(restorer_names(), 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    print("restorers, torch imported:", result.stdout.strip())
    assert result.stdout.strip() == "['deep', 'gat-bm3d'] False"


# --- the device and precision policy ---------------------------------------------------------


def test_device_policy(monkeypatch):
    from dicom_node.restore import device as policy

    assert policy.select_device("cpu") == torch.device("cpu")
    assert policy.select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigurationError, match="unknown device 'tpu'"):
        policy.select_device("tpu")
    cpu = torch.device("cpu")
    assert policy.autocast_dtype(cpu) is None and not policy.needs_grad_scaler(cpu)
    with policy.autocast(cpu):
        assert not torch.is_autocast_enabled()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigurationError, match="device 'cuda' was asked for but no CUDA GPU is available"):
        policy.select_device("cuda")
    assert policy.select_device("auto") == cpu
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert policy.autocast_dtype(cuda) == torch.bfloat16 and not policy.needs_grad_scaler(cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert policy.autocast_dtype(cuda) == torch.float16 and policy.needs_grad_scaler(cuda)


def test_the_device_policy_imports_no_torch():
    code = "import sys\nimport dicom_node.restore.device\nprint('torch' in sys.modules)\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
