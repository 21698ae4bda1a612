"""Detector entries become noise models in one place, which says which entry to add when none fits."""

import numpy as np
import pytest

from dicom_node.config import load_config
from dicom_node.detectors import detector_entry, detector_noise, noise_model_for
from dicom_node.errors import ConfigurationError


def write(tmp_path, text):
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def test_embedded_defaults_do_not_guess_an_uncalibrated_detector():
    config = load_config()
    assert detector_entry(config, "UNKNOWN-SERIAL") is None
    with pytest.raises(
        ConfigurationError, match=r"no noise parameters for detector UNKNOWN-SERIAL: add \[detectors.UNKNOWN-SERIAL\]"
    ):
        noise_model_for(config, "UNKNOWN-SERIAL")
    with pytest.raises(
        ConfigurationError, match=r"\(no Device Serial Number\): add \[detectors.default\].* or pass --gain"
    ):
        noise_model_for(config, None, or_else="pass --gain")


def test_detector_lookup_falls_back_to_default(tmp_path):
    config = load_config(
        write(
            tmp_path,
            "[detectors.default]\ngain = 0.2\nelectronic_noise = 2\noffset = 40\n"
            "[detectors.SN1]\ngain = 0.1\nelectronic_noise = 3\noffset = 50\n",
        )
    )
    assert detector_entry(config, "SN1") == "SN1"
    assert detector_entry(config, "other") == "default"
    noise, name = noise_model_for(config, "other")
    assert (name, noise.gain, noise.electronic_noise, noise.offset) == ("default", 0.2, 2, 40)
    assert detector_noise(config, "SN1").gain == 0.1
    with pytest.raises(ConfigurationError, match=r"detector 'SN2' is not in .*node.toml: add \[detectors.SN2\]"):
        detector_noise(config, "SN2")


def test_gain_map_is_loaded_relative_to_the_file_and_checked(tmp_path):
    np.save(tmp_path / "map.npy", np.full((4, 5), 0.12))
    config = load_config(
        write(tmp_path, "[detectors.SN1]\ngain = 0.1\nelectronic_noise = 3\noffset = 50\ngain_map = 'map.npy'\n")
    )
    assert detector_noise(config, "SN1", (4, 5)).gain.shape == (4, 5)
    with pytest.raises(ConfigurationError, match="map is 4×5 but the image is 8×8"):
        detector_noise(config, "SN1", (8, 8))


def test_unreadable_or_invalid_gain_map_is_a_configuration_error(tmp_path):
    (tmp_path / "broken.npy").write_bytes(b"not numpy")
    np.save(tmp_path / "zeros.npy", np.zeros((4, 5)))
    config = load_config(
        write(
            tmp_path,
            "[detectors.A]\ngain = 0.1\nelectronic_noise = 3\noffset = 50\ngain_map = 'broken.npy'\n"
            "[detectors.B]\ngain = 0.1\nelectronic_noise = 3\noffset = 50\ngain_map = 'zeros.npy'\n",
        )
    )
    with pytest.raises(ConfigurationError, match="detectors.A.gain_map: cannot read"):
        detector_noise(config, "A")
    with pytest.raises(ConfigurationError, match=r"detectors.B: gain \(λ\) must be positive"):
        detector_noise(config, "B")


def test_noise_kernel_is_loaded_relative_to_the_file(tmp_path):
    kernel = np.outer([0.5, 1.0, 0.5], [0.5, 1.0, 0.5])
    kernel /= np.sqrt(np.sum(kernel**2))
    (tmp_path / "detectors").mkdir()
    np.save(tmp_path / "detectors" / "kernel.npy", kernel)
    config = load_config(
        write(
            tmp_path,
            "[detectors.SN1]\ngain = 0.1\nelectronic_noise = 3\noffset = 50\nnoise_kernel = 'detectors/kernel.npy'\n"
            "[detectors.SN2]\ngain = 0.1\nelectronic_noise = 3\noffset = 50\n",
        )
    )
    noise = detector_noise(config, "SN1")
    assert np.array_equal(noise.kernel, kernel)
    assert detector_noise(config, "SN2").kernel is None  # no key: white noise


@pytest.mark.parametrize(
    ("content", "match"),
    [
        pytest.param(b"not numpy", "cannot read", id="unreadable"),
        pytest.param(np.ones((2, 2)) / 2, "odd sides", id="even-sides"),
        pytest.param(np.ones((3, 3)), "unit energy", id="not-unit-energy"),
        pytest.param(np.full((3, 3), np.nan), "unit energy", id="nan"),
        pytest.param(np.array(["a"]), "real numbers", id="strings"),
        pytest.param(np.ones((1, 3, 3)) / 3, "odd sides", id="three-d"),
    ],
)
def test_unreadable_or_invalid_noise_kernel_is_a_configuration_error(tmp_path, content, match):
    path = tmp_path / "kernel.npy"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        np.save(path, content)
    config = load_config(
        write(tmp_path, "[detectors.A]\ngain = 0.1\nelectronic_noise = 3\noffset = 50\nnoise_kernel = 'kernel.npy'\n")
    )
    with pytest.raises(ConfigurationError, match=rf"^detectors\.A\.noise_kernel: .*{match}") as info:
        detector_noise(config, "A")
    print(info.value)
    assert "\n" not in str(info.value)


def test_missing_noise_kernel_file_names_the_key(tmp_path):
    config = load_config(
        write(tmp_path, "[detectors.A]\ngain = 0.1\nelectronic_noise = 3\noffset = 50\nnoise_kernel = 'absent.npy'\n")
    )
    with pytest.raises(ConfigurationError, match=r"detectors\.A\.noise_kernel: cannot read .*absent\.npy"):
        detector_noise(config, "A")
