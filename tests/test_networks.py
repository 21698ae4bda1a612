"""The restoration networks: shapes, gradients, parameter counts and receptive fields."""

import pytest
import torch

from dicom_node.errors import ConfigurationError
from dicom_node.restore.networks import build_network, network_names
from dicom_node.restore.networks.cascade import Cascade

TINY_HRESNET = {"features": 8, "blocks": 2}
TINY = {
    "hresnet": TINY_HRESNET,
    "resnet-at": {"features": 8, "blocks": 2},
    "dncnn": {"features": 8, "layers": 5},
    "cnn5": {"features": 8},
    "cascade": {"first_options": TINY_HRESNET, "second_options": TINY_HRESNET},
}


def conv_parameters(inputs: int, outputs: int, size: int = 3, bias: bool = True) -> int:
    return inputs * outputs * size * size + (outputs if bias else 0)


def batch_norm_parameters(features: int) -> int:
    return 2 * features


def test_registry_names_every_network_of_the_seeds():
    assert network_names() == sorted(TINY)
    with pytest.raises(ConfigurationError, match="unknown network 'unet'.*hresnet"):
        build_network("unet")


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("shape", [(2, 1, 32, 32), (2, 1, 37, 29)])
def test_forward_and_backward_keep_the_shape(name, shape):
    torch.manual_seed(0)
    network = build_network(name, **TINY[name]).train()
    x = torch.rand(shape)
    y = network(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    (y - x.flip(-1)).square().mean().backward()
    for parameter in network.parameters():
        assert torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0


def test_hresnet_defaults_are_the_seed_network():
    network = build_network("hresnet")
    count = sum(p.numel() for p in network.parameters())
    block = 2 * conv_parameters(64, 64) + 2 * batch_norm_parameters(64)
    print(f"HResNet parameters: {count}, receptive field {2 * network.receptive_field_radius + 1}")
    assert count == conv_parameters(1, 64) + 4 * block + conv_parameters(64, 1)
    assert count == pytest.approx(297.7e3, abs=100)  # seed 000: 297.7 k
    assert network.receptive_field_radius == 10  # seed 000: 21×21
    x = torch.rand(1, 1, 24, 40)
    assert network.eval()(x).shape == x.shape


def test_default_parameter_counts():
    counts = {name: sum(p.numel() for p in build_network(name).parameters()) for name in network_names()}
    print("default parameter counts:", counts)
    assert counts["resnet-at"] == pytest.approx(1.7e6, rel=0.05)  # seed 001: "1.700.000"
    middle = conv_parameters(64, 64, bias=False) + batch_norm_parameters(64)
    assert counts["dncnn"] == conv_parameters(1, 64) + 15 * middle + conv_parameters(64, 1, bias=False)
    assert counts["cnn5"] == conv_parameters(1, 64) + 3 * conv_parameters(64, 64) + conv_parameters(64, 1)
    assert counts["cascade"] == 2 * counts["hresnet"]


def measured_radius(network: torch.nn.Module, size: int) -> tuple[int, float]:
    """Largest distance from which an input pixel changes the centre output pixel, and the change.

    The change is measured as the gradient (an infinitesimal perturbation) in float64, in eval
    mode, with all convolution weights made positive: then no ReLU is dead and no paths cancel,
    so the measured support is the architecture's, not an accident of one random initialisation
    (the far corners of a deep net's field weigh about 9^-depth, below rounding on the output).
    """
    torch.manual_seed(1)
    network = network.double().eval()
    with torch.no_grad():
        for layer in network.modules():
            if isinstance(layer, torch.nn.Conv2d):
                layer.weight.uniform_(0, 2 / layer.weight[0].numel())
                if layer.bias is not None:
                    layer.bias.zero_()
    x = (0.5 + 0.1 * torch.rand(1, 1, size, size, dtype=torch.float64)).requires_grad_()
    centre = size // 2
    network(x)[0, 0, centre, centre].backward()
    change = x.grad[0, 0].abs()
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    distance = torch.maximum((rows - centre).abs(), (cols - centre).abs())
    reached = int(distance[change > 0].max())
    assert bool((change[distance <= reached] > 0).all()), "every pixel inside the field matters"
    return reached, float(change[distance == reached].min())


@pytest.mark.parametrize(
    "name, options",
    [(name, TINY[name]) for name in sorted(TINY)]
    # Default depths; ResNet-AT narrowed to 4 features (the width does not change the field) for speed.
    + [(name, {"features": 4} if name == "resnet-at" else {}) for name in sorted(TINY)],
)
def test_receptive_field_radius_is_exact(name, options):
    network = build_network(name, **options)
    radius = network.receptive_field_radius
    reached, change_at_edge = measured_radius(network, size=2 * radius + 9)
    print(f"{name} {options}: claimed radius {radius}, measured {reached} (change at edge {change_at_edge:.2e})")
    assert reached == radius


def test_eval_mode_restores_each_image_independently_of_its_batch():
    torch.manual_seed(2)
    network = build_network("hresnet", **TINY_HRESNET)
    x = torch.rand(4, 1, 32, 32)
    network.train()(x)  # one training step's worth of batch statistics
    network.eval()
    with torch.no_grad():
        assert torch.allclose(network(x)[:1], network(x[:1]), atol=1e-6)
        network.train()
        assert not torch.allclose(network(x)[:1], network(x[:1]), atol=1e-6)


def test_cascade_feeds_the_first_network_into_the_second():
    torch.manual_seed(3)
    cascade = build_network("cascade", **TINY["cascade"])
    assert isinstance(cascade, Cascade)
    assert cascade.receptive_field_radius == 2 * build_network("hresnet", **TINY_HRESNET).receptive_field_radius
    x = torch.rand(2, 1, 32, 32)
    cascade.eval()
    with torch.no_grad():
        assert torch.equal(cascade(x), cascade.second(cascade.first(x)))

    # Stage 2 as the trainer runs it: "first." frozen and in eval mode, "second." trained.
    cascade.train()
    cascade.first.requires_grad_(False).eval()
    stats_before = cascade.first.blocks[0].body[1].running_mean.clone()
    cascade(x).mean().backward()
    assert all(p.grad is None for p in cascade.first.parameters())
    assert all(p.grad is not None for p in cascade.second.parameters())
    assert torch.equal(cascade.first.blocks[0].body[1].running_mean, stats_before)

    with pytest.raises(ValueError, match="single networks"):
        build_network("cascade", second="cascade")
    mixed = build_network(
        "cascade",
        first="cnn5",
        second="dncnn",
        first_options={"features": 4},
        second_options={"features": 4, "layers": 3},
    )
    assert mixed.receptive_field_radius == 5 + 3
