"""A trained GAT-domain denoiser inside the model-based path: target, training task, model store, use.

The trainer's task "denoise" learns E[f(z)] (the GAT-domain expectation that the unbiased inverse
maps to the truth) from the GAT of simulated low-dose phantoms; gat-bm3d with denoiser = "network"
uses it in BM3D's place. Tiny network and phantoms: seconds on 2 CPU cores.
"""

import json

import numpy as np
import pytest

from dicom_node.errors import ConfigurationError
from dicom_node.restore.deep import DeepRestorer, resolve_model
from dicom_node.restore.deep.card import TASKS
from dicom_node.restore.deep.store import SHIPPED_MODEL_DIR
from dicom_node.restore.gat import gat_expectation, gat_forward, gat_inverse
from dicom_node.restore.noise import NoiseModel
from dicom_node.restore.registry import Environment, check_restorer_options, create_restorer
from dicom_node.sim.acquisition import acquire, crosstalk_kernel
from dicom_node.sim.phantom import make_phantom
from trainer.cli import main
from trainer.data import extract_patches, make_pairs, phantom_images
from trainer.experiment import parse_experiment

SIM = NoiseModel(0.1, 3.0, 50.0)
TINY_DENOISER = """
name = "tiny-denoiser"
seed = 4
[network]
name = "dncnn"
options = { features = 8, layers = 4 }
[data]
task = "denoise"
phantoms = 4
phantom_size = [192, 160]
dose_fraction = 0.5
patch_size = 32
patches_per_image = 64
validation_images = 1
normalisation = { domain = "anscombe", scale = 10.0 }
[training]
epochs = 2
batch_size = 16
learning_rate = 1e-3
betas = [0.9, 0.999]
loss = "mse"
"""


def test_gat_expectation_is_the_mean_of_the_transform_and_inverts_exactly():
    rng = np.random.default_rng(0)
    signal = np.array([2.0, 20.0, 200.0, 2000.0])
    expectation = gat_expectation(signal, SIM)
    for value, expected in zip(signal, expectation, strict=True):
        z = SIM.gain * rng.poisson(value / SIM.gain, 400_000) + rng.normal(0, 3.0, 400_000) + SIM.offset
        assert gat_forward(z, SIM).mean() == pytest.approx(expected, abs=0.01)
    np.testing.assert_allclose(gat_inverse(expectation, SIM), signal + SIM.offset, rtol=1e-9)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"source": "dicom", "folder": "x"}, 'task = "denoise" needs source = "phantom"'),
        ({"normalisation": {"domain": "raw"}}, "the anscombe domain"),
        ({"extra_dose_fractions": [1.5]}, r"extra_dose_fractions must lie in \(0, 1\)"),
        ({"task": "restore", "normalisation": {"domain": "raw"}, "extra_dose_fractions": [0.25]}, "is for task"),
    ],
)
def test_a_denoiser_needs_phantoms_and_the_gat_domain(change, fragment):
    data = {"task": "denoise", "dose_fraction": 0.5, "normalisation": {"domain": "anscombe", "scale": 10.0}}
    with pytest.raises(ConfigurationError, match=fragment):
        parse_experiment({"name": "x", "network": {"name": "dncnn"}, "data": {**data, **change}})


def test_denoise_pairs_are_the_gat_of_low_dose_and_its_noise_free_expectation():
    from dicom_node.restore.normalisation import Normalisation

    image = phantom_images(1, 0, (192, 160), SIM)[0]
    patches = extract_patches(image, 32, 8, np.random.default_rng(1))
    normalisation = Normalisation("anscombe", 10.0)
    draws = [
        make_pairs([patches], 0.5, normalisation, np.random.default_rng(seed), task="denoise") for seed in range(64)
    ]
    inputs = np.stack([x for x, _ in draws])
    target = draws[0][1]
    assert all(np.array_equal(t, target) for _, t in draws)  # the truth's expectation: no noise
    expected = gat_expectation(0.5 * patches.truth.astype(np.float64), patches.noise) / 10.0
    np.testing.assert_allclose(target[:, 0], expected, rtol=1e-6)
    noise = (inputs - target[None]) * 10.0  # GAT units
    print(f"input noise in GAT units: mean {noise.mean():.4f}, std {noise.std():.4f}")
    assert abs(noise.mean()) < 0.02 and noise.std() == pytest.approx(1.0, abs=0.05)


def test_a_denoiser_can_learn_at_several_doses():
    """One dose drawn per image: targets are each image's expectation at its own dose."""
    from dicom_node.restore.normalisation import Normalisation

    images = phantom_images(6, 0, (192, 160), SIM)
    groups = [extract_patches(image, 32, 4, np.random.default_rng(i)) for i, image in enumerate(images)]
    _, targets = make_pairs(
        groups, [0.5, 0.25], Normalisation("anscombe", 10.0), np.random.default_rng(2), task="denoise"
    )
    doses = []
    for index, group in enumerate(groups):
        target = targets[4 * index : 4 * index + 4, 0]
        matches = [
            dose
            for dose in (0.5, 0.25)
            if np.allclose(
                target, gat_expectation(dose * group.truth.astype(np.float64), group.noise) / 10.0, rtol=1e-5
            )
        ]
        assert len(matches) == 1
        doses.append(matches[0])
    print("doses drawn per image:", doses)
    assert set(doses) == {0.5, 0.25}


@pytest.fixture(scope="module")
def denoiser_model(tmp_path_factory):
    """The tiny denoiser trained and exported through the CLI, next to a copy of the shipped models."""
    folder = tmp_path_factory.mktemp("denoiser")
    (folder / "tiny.toml").write_text(TINY_DENOISER)
    models = folder / "models"
    models.mkdir()
    for path in SHIPPED_MODEL_DIR.iterdir():
        (models / path.name).write_bytes(path.read_bytes())
    for argv in (
        ["train", "--config", str(folder / "tiny.toml"), "--out", str(folder / "run"), "--quiet"],
        ["export", str(folder / "run"), "--name", "tiny-denoiser", "--out", str(models)],
    ):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
    return models


def test_the_store_tells_denoisers_from_restorers(denoiser_model):
    card = json.loads((denoiser_model / "tiny-denoiser.json").read_text())
    assert card["task"] == "denoise" and card["network"] == "dncnn"
    assert resolve_model(denoiser_model, None, None, tasks=("denoise",)) == "tiny-denoiser"
    assert resolve_model(denoiser_model, None, 0.5) != "tiny-denoiser"  # restoring models only
    assert resolve_model(denoiser_model, None, 0.5, TASKS) == "tiny-denoiser"  # the newest serving 0.5
    with pytest.raises(ConfigurationError, match="is a 'restore' model, not a 'denoise' one"):
        resolve_model(denoiser_model, "hresnet-phantom-50", None, tasks=("denoise",))


def test_the_deep_restorer_runs_a_denoiser_as_the_cnn_on_vst(denoiser_model):
    """GAT → network → unbiased inverse → blend (spectral for a network trained for the MSE), for
    the doses it was trained at only; a blend is refused for an end-to-end model."""
    phantom = make_phantom((160, 128), seed=76, pixel_spacing_mm=0.07)
    low = acquire(phantom.signal, SIM, 0.5, 2).astype(np.float64)
    restorer = DeepRestorer(model="tiny-denoiser", model_dir=denoiser_model, device="cpu")
    result = restorer.restore(low, SIM, 0.5)
    assert result.provenance.method == "deep" and result.provenance.model_name == "tiny-denoiser"
    assert result.provenance.options == {"model": "tiny-denoiser", "blend": "spectral", "noise": "white"}
    assert result.qc["mean_ratio"] == pytest.approx(1.0, abs=0.02) and "predicted_noise_ratio" in result.qc
    plain = DeepRestorer(model="tiny-denoiser", model_dir=denoiser_model, device="cpu", blend="plain")
    assert plain.restore(low, SIM, 0.5).provenance.options["blend"] == "plain"
    with pytest.raises(ConfigurationError, match="trained for dose fraction 0.5, not 0.25"):
        restorer.restore(low, SIM, 0.25)
    with pytest.raises(ConfigurationError, match="blend is for denoising models"):
        DeepRestorer(model="hresnet-phantom-50", model_dir=denoiser_model, device="cpu", blend="plain")


def test_gat_bm3d_runs_the_network_in_place_of_bm3d(denoiser_model):
    environment = Environment(device="cpu", model_dir=denoiser_model)
    restorer = create_restorer("gat-bm3d", environment, denoiser="network")
    phantom = make_phantom((192, 160), seed=77, pixel_spacing_mm=0.07)
    low = acquire(phantom.signal, SIM, 0.5, 3).astype(np.float64)
    result = restorer.restore(low, SIM, 0.5)
    print({k: round(v, 3) for k, v in result.qc.items()}, result.timings)
    assert result.provenance.options["denoiser"] == "network" and result.provenance.model_name == "tiny-denoiser"
    assert (
        result.provenance.model_digest
        == json.loads((denoiser_model / "tiny-denoiser.json").read_text())["weights_sha256"]
    )
    assert np.all(np.isfinite(result.image)) and result.qc["mean_ratio"] == pytest.approx(1.0, abs=0.02)
    assert 0 < result.qc["predicted_noise_ratio"] < 2

    coloured = NoiseModel(SIM.gain, SIM.electronic_noise, SIM.offset, crosstalk_kernel(0.5))
    with pytest.raises(ConfigurationError, match="trained for noise whose neighbours correlate by 0.00"):
        restorer.restore(low, coloured, 0.5)
    with pytest.raises(ConfigurationError, match='needs denoiser = "network"'):
        check_restorer_options("gat-bm3d", {"model": "tiny-denoiser"})
    empty = denoiser_model.parent / "empty"
    empty.mkdir()
    with pytest.raises(ConfigurationError, match="no 'denoise' model"):
        create_restorer("gat-bm3d", Environment(model_dir=empty), denoiser="network")


def test_the_shipped_denoisers_are_found_and_restore():
    """The newest shipped denoiser (gat-dncnn-maps, conditioned) is gat-bm3d's network and the deep
    restorer's default at half and quarter dose; it takes correlated noise in its trained range."""
    environment = Environment(device="cpu", model_dir=SHIPPED_MODEL_DIR)
    restorer = create_restorer("gat-bm3d", environment, denoiser="network")
    assert resolve_model(SHIPPED_MODEL_DIR, None, 0.5, TASKS) == "gat-dncnn-maps"
    assert resolve_model(SHIPPED_MODEL_DIR, None, 0.25, TASKS) == "gat-dncnn-maps"
    phantom = make_phantom((192, 160), seed=78, pixel_spacing_mm=0.07)
    coloured = NoiseModel(SIM.gain, SIM.electronic_noise, SIM.offset, crosstalk_kernel(0.25))
    reached = []
    for noise in (SIM, coloured):
        low = acquire(phantom.signal, noise, 0.5, 4).astype(np.float64)
        result = restorer.restore(low, noise, 0.5)
        print({k: round(v, 3) for k, v in result.qc.items()})
        assert result.provenance.model_name == "gat-dncnn-maps"
        assert result.qc["mean_ratio"] == pytest.approx(1.0, abs=0.01)
        reached.append(result.qc["predicted_noise_ratio"])
    assert reached[0] == pytest.approx(1.0, abs=0.05) and reached[1] < 1.3  # moderate crosstalk: near it
    white = create_restorer("gat-bm3d", environment, denoiser="network", model="gat-dncnn")
    result = white.restore(acquire(phantom.signal, SIM, 0.5, 4).astype(np.float64), SIM, 0.5)
    assert result.qc["predicted_noise_ratio"] == pytest.approx(1.0, abs=0.05)  # full-dose noise within reach


def test_process_restores_with_the_network_denoiser(denoiser_model, tmp_path, monkeypatch, capsys):
    """Offline, as IT would try it: the derived image is valid and its report names the model."""
    from dicom_node.cli import main as node_main

    from dicomtools import dciodvfy_errors, low_dose_mammogram

    monkeypatch.setenv("DICOM_NODE_MODEL_DIR", str(denoiser_model))
    source = low_dose_mammogram(tmp_path / "half.dcm", seed=3, shape=(160, 128), dose_fraction=0.5, noise_seed=1)
    out = tmp_path / "out.dcm"
    args = [str(source), str(out), "--dose-fraction", "0.5", "--denoiser", "network", "--json"]
    with pytest.raises(SystemExit) as info:
        node_main(["process", *args])
    stdout, stderr = capsys.readouterr()
    assert info.value.code == 0, stderr
    report = json.loads(stdout)
    print(json.dumps({k: report[k] for k in ("pipeline", "qc")}, indent=1))
    assert "tiny-denoiser" in json.dumps(report)
    assert dciodvfy_errors(out) == []
