"""Training losses: SSIM, the pixel losses, weighted combinations and the VGG16 perceptual losses.

The perceptual-loss tests use RANDOMLY INITIALISED VGG16 weights, saved with torch.save in
torchvision's state-dict layout to a temporary file: real ImageNet weights cannot be downloaded
here, and the tests check loading, layer selection and gradients, not what the features mean.
"""

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from dicom_node.errors import ConfigurationError
from trainer.losses import LOSS_NAMES, loss_weights, make_loss, ssim
from trainer.vgg import VGG16Features, load_vgg16_features


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """Random (not ImageNet) VGG16 weights in torchvision's layout, plus a classifier key to ignore."""
    torch.manual_seed(0)
    state = VGG16Features().state_dict()
    state["classifier.6.bias"] = torch.zeros(1000)
    path = tmp_path_factory.mktemp("vgg") / "vgg16-random.pth"
    torch.save(state, path)
    return path


def images(seed=0, shape=(2, 1, 48, 48), noise=0.0):
    generator = torch.Generator().manual_seed(seed)
    rows = torch.linspace(0, 1, shape[-2]).view(-1, 1)
    clean = (0.3 + 0.4 * rows * torch.linspace(0, 1, shape[-1])).expand(shape).contiguous()
    clean = clean + 0.05 * torch.rand(shape, generator=generator)
    return clean, clean + noise * torch.randn(shape, generator=generator)


def reference_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al.'s SSIM with scipy's Gaussian filter (11 taps: radius 5 = truncate·σ), valid windows."""
    blur = lambda x: gaussian_filter(x, 1.5, truncate=5 / 1.5)[5:-5, 5:-5]  # noqa: E731
    mean_a, mean_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mean_a**2, blur(b * b) - mean_b**2
    cov = blur(a * b) - mean_a * mean_b
    c1, c2 = 0.01**2, 0.03**2
    return float(
        np.mean((2 * mean_a * mean_b + c1) * (2 * cov + c2) / ((mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2)))
    )


def test_ssim_is_one_for_identical_images_and_drops_with_noise():
    clean, _ = images()
    assert ssim(clean, clean).item() == pytest.approx(1.0, abs=1e-6)
    values = [ssim(images(noise=sigma)[1], clean).item() for sigma in (0.01, 0.03, 0.1)]
    print("SSIM at noise σ 0.01, 0.03, 0.1:", [round(v, 4) for v in values])
    assert 1.0 > values[0] > values[1] > values[2] > 0.0


def test_ssim_matches_an_independent_implementation():
    clean, noisy = images(noise=0.05, shape=(1, 1, 40, 52))
    expected = reference_ssim(noisy[0, 0].double().numpy(), clean[0, 0].double().numpy())
    measured = ssim(noisy.double(), clean.double()).item()
    print(f"SSIM {measured:.6f}, scipy reference {expected:.6f}")
    assert measured == pytest.approx(expected, abs=1e-9)
    assert ssim(noisy, clean, data_range=10.0).item() > measured  # larger constants forgive more
    with pytest.raises(ValueError, match="11×11"):
        ssim(clean[..., :8, :8], clean[..., :8, :8])


def test_ssim_keeps_full_precision_under_mixed_precision():
    """C₁ = 1e-4 and the variances need float32: autocast (bf16 on CPU here, fp16 on CUDA) is off inside."""
    clean, noisy = images(noise=0.02)
    expected = ssim(noisy, clean)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        measured = ssim(noisy, clean)
    assert measured.dtype == torch.float32 and measured.item() == pytest.approx(expected.item(), abs=1e-6)


# "protocol" compares restorations with the truth through packed targets: tests/test_protocol_training.py
@pytest.mark.parametrize("name", [n for n in LOSS_NAMES if not n.startswith("pl") and n != "protocol"])
def test_pixel_losses_run_backpropagate_and_are_smallest_at_the_target(name):
    target, noisy = images(noise=0.05)
    prediction = noisy.clone().requires_grad_()
    loss = make_loss(name)
    value = loss(prediction, target)
    value.backward()
    print(f"{name}: {value.item():.5f}")
    assert value.item() > 0 and torch.isfinite(prediction.grad).all() and prediction.grad.abs().sum() > 0
    floor = 1e-3 if name == "charbonnier" else 0.0  # √(0 + ε²) = ε
    assert loss(target, target).item() == pytest.approx(floor, abs=1e-6)


def test_pixel_losses_follow_their_formulas():
    target, noisy = images(noise=0.05)
    d = (noisy - target).double().numpy()
    assert make_loss("mse")(noisy, target).item() == pytest.approx(np.mean(d**2), rel=1e-5)
    assert make_loss("mae")(noisy, target).item() == pytest.approx(np.mean(np.abs(d)), rel=1e-5)
    assert make_loss("charbonnier")(noisy, target).item() == pytest.approx(np.mean(np.sqrt(d**2 + 1e-6)), rel=1e-5)
    assert make_loss("ssim")(noisy, target).item() == pytest.approx(1 - ssim(noisy, target).item(), abs=1e-7)


def test_weights_combine():
    target, noisy = images(noise=0.05)
    mse, mae, ssim_loss = (make_loss(n)(noisy, target) for n in ("mse", "mae", "ssim"))
    assert make_loss({"mse": 1, "mae": 2})(noisy, target).item() == pytest.approx((mse + 2 * mae).item(), rel=1e-6)
    assert make_loss("mse+10ssim")(noisy, target).item() == pytest.approx((mse + 10 * ssim_loss).item(), rel=1e-6)
    assert loss_weights({"mse+10ssim": 2, "mse": 1}) == {"mse": 3.0, "ssim": 20.0}
    for bad, message in (("l2", "unknown loss 'l2'"), ({}, "at least one"), ({"mse": -1}, "positive")):
        with pytest.raises(ConfigurationError, match=message):
            make_loss(bad)


@pytest.mark.parametrize("name", ["pl1", "pl2", "pl3", "pl4", "pl4-nopool"])
def test_perceptual_losses_load_the_file_and_backpropagate(vgg_file, name):
    target, noisy = images(noise=0.05, shape=(2, 1, 16, 16))
    loss = make_loss(name, vgg_weights=vgg_file)
    prediction = noisy.clone().requires_grad_()
    value = loss(prediction, target)
    value.backward()
    print(f"{name} (random VGG weights): {value.item():.3e}")
    assert value.item() > 0 and prediction.grad.abs().sum() > 0
    assert loss(target, target).item() == 0.0
    assert all(not p.requires_grad for p in loss.parameters())
    first_conv = loss.terms[name].layers[0]
    assert torch.equal(first_conv.weight, torch.load(vgg_file)["features.0.weight"])


def test_perceptual_layers_are_the_seed_layers(vgg_file):
    """relu1_2..relu4_3 at 1, 1/2, 1/4, 1/8 resolution; PL4 without pooling at full resolution."""
    loss = make_loss({f"pl{k}": 1 for k in range(1, 5)} | {"pl4-nopool": 1}, vgg_weights=vgg_file)
    x = torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        shapes = {name: tuple(term.features(x).shape[1:]) for name, term in loss.terms.items()}
    print("feature shapes:", shapes)
    assert shapes == {
        "pl1": (64, 16, 16),
        "pl2": (128, 8, 8),
        "pl3": (256, 4, 4),
        "pl4": (512, 2, 2),
        "pl4-nopool": (512, 16, 16),
    }
    assert isinstance(loss.terms["pl4"].layers[-1], torch.nn.ReLU)
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in loss.terms["pl4-nopool"].layers) == 0


def test_vgg_layout_is_torchvisions_and_frozen(vgg_file):
    keys = list(VGG16Features().state_dict())
    convs = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
    assert keys == [f"features.{i}.{kind}" for i in convs for kind in ("weight", "bias")]
    vgg = load_vgg16_features(vgg_file)
    assert not vgg.training and all(not p.requires_grad for p in vgg.parameters())


def test_perceptual_losses_refuse_without_a_weights_file(tmp_path):
    with pytest.raises(ConfigurationError, match="no VGG16 weights file given.*vgg16-397923af.pth"):
        make_loss("pl4")
    missing = tmp_path / "nowhere" / "vgg16.pth"
    with pytest.raises(ConfigurationError, match=f"{missing}.*does not exist.*vgg16-397923af.pth"):
        make_loss({"mse": 1, "pl2": 0.1}, vgg_weights=missing)
    renamed = tmp_path / "renamed.pth"
    torch.save({k.replace("features", "body"): v for k, v in VGG16Features().state_dict().items()}, renamed)
    with pytest.raises(ConfigurationError, match=f"{renamed} is not in torchvision's VGG16 layout.*missing"):
        make_loss("pl1", vgg_weights=renamed)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ConfigurationError, match=f"{garbage} is not a readable torch state dict"):
        make_loss("pl1", vgg_weights=garbage)
    pixel = make_loss("mse", vgg_weights=None)  # the pixel losses need no file
    a, b = torch.zeros(1, 1, 8, 8), torch.full((1, 1, 8, 8), 0.5)
    assert float(pixel(a, b)) == pytest.approx(0.25)
