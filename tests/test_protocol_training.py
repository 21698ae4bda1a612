"""The "CNN on VST" training: the protocol loss, patches acquired from the truth, conditioned networks.

The protocol loss (B² + w·|RN − RN_FD| after the unbiased inverse and the plain blend) is checked
against what it must measure on known inputs; per-patch detectors, crosstalk, doses and
realisations against their settings; a conditioned DnCNN (noise-level maps) from training to
gat-bm3d. Tiny patches and networks: seconds on 2 CPU cores.
"""

import json

import numpy as np
import pytest
import torch

from dicom_node.errors import ConfigurationError
from dicom_node.restore.blend import noise_level_maps
from dicom_node.restore.calibration import kernel_neighbour_correlations
from dicom_node.restore.deep.denoiser import NetworkDenoiser
from dicom_node.restore.deep.store import SHIPPED_MODEL_DIR
from dicom_node.restore.deep.tiling import tiled_inference
from dicom_node.restore.gat import gat_expectation, gat_forward
from dicom_node.restore.networks import build_network
from dicom_node.restore.noise import NoiseModel
from dicom_node.restore.registry import Environment, create_restorer
from dicom_node.sim.acquisition import acquire, crosstalk_kernel, gaussian_kernel
from dicom_node.sim.phantom import make_phantom
from trainer.cli import main
from trainer.data import PACKED_TARGETS, PatchData, acquired_pairs, extract_patches, phantom_images
from trainer.experiment import parse_experiment
from trainer.losses import ProtocolLoss
from trainer.train import _shuffled, load_initial_weights

SIM = NoiseModel(0.1, 3.0, 50.0)
SCALE = 10.0
TINY_VST = """
name = "tiny-vst"
seed = 2
[network]
name = "dncnn"
options = { features = 8, layers = 4, conditions = 2 }
[data]
task = "denoise"
phantoms = 3
phantom_size = [192, 160]
dose_fraction = 0.5
extra_dose_fractions = [0.25]
low_dose_from = "truth"
realisations = 3
detector_ranges = { gain = [0.05, 0.2], electronic_noise = [2.0, 5.0], offset = [30.0, 100.0] }
crosstalk_range = [0.0, 0.5]
noise_level_maps = true
resimulate = true
patch_size = 24
patches_per_image = 24
validation_images = 1
normalisation = { domain = "anscombe", scale = 10.0 }
[training]
epochs = 3
batch_size = 12
learning_rate = 1e-3
betas = [0.9, 0.999]
loss = "protocol"
rn_weight = 2.0
"""


def experiment(**changes):
    import tomllib

    data = tomllib.loads(TINY_VST)
    for key, value in changes.items():
        section, leaf = key.split("__")
        data[section][leaf] = value
    return parse_experiment(data)


def flat_groups(prediction_of, realisations=200, signal=1000.0, dose=0.5, noise=SIM, shape=(16, 16)):
    """(prediction, packed targets) of one flat patch acquired `realisations` times."""
    rng = np.random.default_rng(5)
    truth = np.full(shape, signal)
    lows = [acquire(truth, noise, dose, rng).astype(np.float64) for _ in range(realisations)]
    clean = gat_expectation(dose * truth, noise) / SCALE
    constants = [np.full(shape, v) for v in (noise.gain, noise.electronic_noise**2, dose)]
    targets = np.stack([np.stack([clean, truth, low - noise.offset, *constants]) for low in lows])
    predictions = np.stack([prediction_of(low, clean)[None] for low in lows])
    return torch.tensor(predictions, dtype=torch.float32), torch.tensor(targets, dtype=torch.float32)


def full_dose_noise(signal=1000.0, noise=SIM):
    return (noise.gain * signal + noise.electronic_noise**2) / signal


def test_the_protocol_loss_measures_the_noise_and_the_bias():
    """A noise-free estimate: the plain blend gives exactly full-dose noise and no bias (loss ≈ 0).
    The low-dose input as the estimate: the low-dose noise (1/r² of its variance), still no bias.
    A shifted estimate: bias that grows with the square of the shift. All relative to RN_FD."""
    rn_fd = full_dose_noise()
    loss = ProtocolLoss(200, rn_weight=1.0, scale=SCALE)
    bias_only = ProtocolLoss(200, rn_weight=1e-9, scale=SCALE)

    clean = flat_groups(lambda low, clean: clean)
    assert float(loss(*clean)) < 0.05

    identity = flat_groups(lambda low, clean: gat_forward(low, SIM) / SCALE)
    rn_ld = (0.5 * SIM.gain * 1000 + SIM.electronic_noise**2) / 0.5**2 / 1000
    assert float(loss(*identity)) == pytest.approx(rn_ld / rn_fd - 1, rel=0.05)
    assert abs(float(bias_only(*identity))) < 0.02

    shifted = [float(bias_only(*flat_groups(lambda low, clean, s=s: clean + s / SCALE))) for s in (0.2, 0.4)]
    # D = E + s raises the estimate by λ·((E + s)² − E²)/4 ADU; the blend keeps (1/r − ω₁) of that
    expectation = float(gat_expectation(np.array(500.0), SIM))
    w_low = np.sqrt((SIM.gain * 1000 + 9) / (SIM.gain * 500 + 9))
    bias = (2 - w_low) * SIM.gain * ((expectation + 0.2) ** 2 - expectation**2) / 4
    assert shifted[0] == pytest.approx(bias**2 / 1000 / rn_fd, rel=0.2)
    assert shifted[1] == pytest.approx(4 * shifted[0], rel=0.15)


def test_the_protocol_loss_needs_realisations():
    with pytest.raises(ConfigurationError, match="2 or more realisations"):
        ProtocolLoss(1, 1.0, SCALE)


def test_acquired_pairs_draw_a_detector_dose_and_crosstalk_per_patch():
    settings = experiment().data
    image = phantom_images(1, 11, (192, 160), SIM)[0]
    patches = extract_patches(image, 24, 20, np.random.default_rng(0))
    inputs, targets = acquired_pairs([patches], settings, settings.normalisation.build(), np.random.default_rng(1))
    r = settings.realisations
    assert inputs.shape == (20 * r, 3, 24, 24) and targets.shape == (20 * r, len(PACKED_TARGETS), 24, 24)
    groups = targets.reshape(20, r, *targets.shape[1:])
    np.testing.assert_array_equal(groups[:, 1:, 1], groups[:, :1, 1].repeat(r - 1, axis=1))  # one truth per patch
    assert not np.array_equal(inputs[0, 0], inputs[1, 0])  # realisations differ
    gains, electronic, doses = (groups[:, 0, PACKED_TARGETS.index(n), 0, 0] for n in PACKED_TARGETS[3:])
    assert np.all((gains >= 0.05) & (gains <= 0.2)) and len(set(gains.tolist())) == 20
    assert np.all((electronic >= 4.0) & (electronic <= 25.0)) and set(doses.tolist()) == {0.5, 0.25}
    highest = np.mean(kernel_neighbour_correlations(crosstalk_kernel(0.5)))
    correlations = inputs[::r, 2, 0, 0]
    assert np.all((correlations >= 0) & (correlations <= highest + 1e-6)) and correlations.std() > 0.05

    first = groups[0, 0]
    noise = NoiseModel(float(first[3, 0, 0]), float(np.sqrt(first[4, 0, 0])), 0.0)  # offset-free channels
    gat = gat_forward(first[2].astype(np.float64), noise)
    np.testing.assert_allclose(inputs[0, 0], gat / SCALE, rtol=1e-5)
    np.testing.assert_allclose(inputs[0, 1], noise_level_maps(gat, noise, float(first[5, 0, 0]))[0], rtol=1e-5)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"training__batch_size": 10}, "multiple of data.realisations"),
        ({"data__realisations": 1}, "realisations must be 2 or more"),
        ({"data__low_dose_from": "full-dose"}, 'need low_dose_from = "truth"'),
        ({"network__options": {"features": 8, "layers": 4}}, "conditions must be 2"),
        ({"data__crosstalk_range": [0.5, 0.2]}, "crosstalk_range must be"),
        ({"data__noise_correlation": 0.3}, "noise_correlation or crosstalk_range"),
        ({"data__detector_ranges": {"gain": [0.0, 0.1], "electronic_noise": [1, 2], "offset": [0, 1]}}, "gain must"),
    ],
)
def test_experiments_that_cannot_work_are_refused(changes, message):
    with pytest.raises(ConfigurationError, match=message):
        experiment(**changes)


def test_batches_keep_the_realisations_of_a_patch_together():
    order = _shuffled(12, 3, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(12))
    assert all(order[i] // 3 == order[i + 1] // 3 == order[i + 2] // 3 for i in range(0, 12, 3))
    assert order.tolist() != list(range(12))


def test_a_conditioned_dncnn_starts_as_the_unconditioned_one():
    plain = build_network("dncnn", features=32, layers=12).eval()
    conditioned = build_network("dncnn", features=32, layers=12, conditions=2).eval()
    weights = SHIPPED_MODEL_DIR / "gat-dncnn.safetensors"
    load_initial_weights(plain, weights)
    with pytest.raises(ConfigurationError, match="condition.weight"):
        load_initial_weights(conditioned, weights)
    load_initial_weights(conditioned, weights, may_lack=["condition."])
    x = torch.rand(2, 3, 40, 40) * 20
    with torch.no_grad():
        torch.testing.assert_close(conditioned(x), plain(x[:, :1]))
    with pytest.raises(ValueError, match="needs 3 channels, got 1"):
        conditioned(x[:, :1])


def test_tiles_carry_the_maps():
    torch.manual_seed(0)
    net = build_network("dncnn", features=8, layers=4, conditions=2).eval()
    torch.nn.init.normal_(net.condition.weight)
    image = np.random.default_rng(0).random((3, 70, 90)).astype(np.float32)
    with torch.no_grad():
        whole = net(torch.from_numpy(image)[None])[0, 0].numpy()
    np.testing.assert_allclose(tiled_inference(net, image, tile=32, batch=3), whole, atol=1e-5)


@pytest.fixture(scope="module")
def vst_model(tmp_path_factory):
    """The tiny conditioned model trained with the protocol loss and exported through the CLI."""
    folder = tmp_path_factory.mktemp("vst")
    (folder / "tiny.toml").write_text(TINY_VST)
    models = folder / "models"
    for argv in (
        ["train", "--config", str(folder / "tiny.toml"), "--out", str(folder / "run"), "--quiet"],
        ["export", str(folder / "run"), "--name", "tiny-vst", "--out", str(models)],
    ):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
    return models, folder / "run"


def test_protocol_training_lowers_the_loss_and_its_card_says_what_it_serves(vst_model):
    models, run = vst_model
    history = torch.load(run / "checkpoint.pt", weights_only=False)["history"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    card = json.loads((models / "tiny-vst.json").read_text())
    simulation = card["noise_simulation"]
    assert card["task"] == "denoise" and card["loss"] == "protocol" and card["training"]["rn_weight"] == 2.0
    assert simulation["realisations"] == 3 and simulation["noise_level_maps"] is True
    assert simulation["dose_fractions"] == [0.5, 0.25] and simulation["crosstalk_range"] == [0.0, 0.5]
    assert simulation["detector_ranges"]["gain"] == [0.05, 0.2]
    correlation = simulation["neighbour_correlation"]
    assert correlation["lowest"] == 0 and correlation["highest"] == pytest.approx(
        np.mean(kernel_neighbour_correlations(crosstalk_kernel(0.5))), abs=1e-3
    )


def test_gat_bm3d_runs_a_conditioned_denoiser_within_its_range(vst_model):
    models, _ = vst_model
    environment = Environment(device="cpu", model_dir=models)
    restorer = create_restorer("gat-bm3d", environment, denoiser="network", model="tiny-vst", blend="plain")
    phantom = make_phantom((160, 128), seed=79, pixel_spacing_mm=0.07)
    coloured = NoiseModel(SIM.gain, SIM.electronic_noise, SIM.offset, crosstalk_kernel(0.3))
    for noise, dose in ((SIM, 0.5), (coloured, 0.25)):
        low = acquire(phantom.signal, noise, dose, 3).astype(np.float64)
        result = restorer.restore(low, noise, dose)
        assert result.provenance.model_name == "tiny-vst" and result.provenance.options["noise"] in (
            "white",
            "coloured",
        )
        assert np.all(np.isfinite(result.image)) and result.qc["mean_ratio"] == pytest.approx(1.0, abs=0.03)

    strong = NoiseModel(SIM.gain, SIM.electronic_noise, SIM.offset, gaussian_kernel(2.0))
    with pytest.raises(ConfigurationError, match=r"correlate by 0.00 to 0.6\d; this detector.s kernel gives 0.94"):
        restorer.restore(acquire(phantom.signal, strong, 0.5, 3).astype(np.float64), strong, 0.5)
    unbound = NetworkDenoiser("tiny-vst", models, device="cpu")
    with pytest.raises(ConfigurationError, match="bind them with for_image"):
        unbound(np.full((40, 40), 50.0), 1.0)


def test_the_validation_figures_use_the_image_target():
    """PSNR and SSIM of a protocol run compare the output with channel 0 (the GAT-domain expectation)."""
    data = PatchData(experiment(data__patches_per_image=6).data, 0)
    inputs, targets = data.validation_pairs
    assert targets.shape[1] == len(PACKED_TARGETS) and inputs.shape[1] == 3
    assert float(np.abs(inputs[:, 0] - targets[:, 0]).mean()) < 0.2  # unit GAT noise / scale 10


def test_a_card_names_its_starting_weights_portably(tmp_path):
    """A conditioned MSE denoiser started from the shipped gat-dncnn: the card names the weights it
    started from relative to the project, with their digest, and no RN weight (no protocol term)."""
    from dicom_node.restore.deep.store import file_sha256

    start = SHIPPED_MODEL_DIR / "gat-dncnn.safetensors"
    text = TINY_VST.replace("features = 8, layers = 4", "features = 32, layers = 12")
    text = text.replace("realisations = 3", "realisations = 1").replace('loss = "protocol"', 'loss = "mse"')
    text = text.replace("epochs = 3", "epochs = 1").replace("rn_weight = 2.0", f'init_from = "{start}"')
    (tmp_path / "maps.toml").write_text(text + 'init_missing = ["condition."]\n')
    for argv in (
        ["train", "--config", str(tmp_path / "maps.toml"), "--out", str(tmp_path / "run"), "--quiet"],
        ["export", str(tmp_path / "run"), "--name", "maps", "--out", str(tmp_path / "models")],
    ):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
    card = json.loads((tmp_path / "models" / "maps.json").read_text())
    assert card["training"]["init_from"] == "dicom_node/models/gat-dncnn.safetensors"
    assert card["training"]["init_from_sha256"] == file_sha256(start)
    assert card["training"]["rn_weight"] is None and card["noise_simulation"]["realisations"] == 1
