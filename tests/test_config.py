"""The configuration loader: defaults, the example file, and one-line errors naming the key."""

from pathlib import Path

import pytest

from dicom_node.config import load_config
from dicom_node.errors import ConfigurationError

REPO = Path(__file__).resolve().parents[1]


def test_embedded_defaults_are_valid_and_name_the_simulated_detector():
    config = load_config()
    assert config.path is None
    assert config.node.ae_title == "DOSENODE"
    assert "SIM-0001" in config.detectors
    assert config.database_url.startswith("sqlite:///")


def test_example_config_is_valid():
    config = load_config(REPO / "config" / "example.toml")
    assert config.profiles["half-dose"].dose_fraction == 0.5
    assert [d.name for d in config.destinations] == ["pacs", "outbox"]
    assert config.resolve(Path("outbox")) == REPO / "config" / "outbox"


def test_environment_variable_names_the_file(config_file, monkeypatch):
    path = config_file('[node]\nae_title = "FROMENV"\n')
    monkeypatch.setenv("DICOM_NODE_CONFIG", str(path))
    assert load_config().node.ae_title == "FROMENV"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[node]\nport = 70000\n", "node.port"),
        ("[node]\naetitle = 'X'\n", "node.aetitle: unknown key"),
        ("[node]\nae_title = 'MUCH_TOO_LONG_AE_TITLE'\n", "node.ae_title"),
        ("[profiles.p]\ndose_fraction = 1.5\n", "profiles.p.dose_fraction"),
        ("[profiles.p]\ndose_fraction = 0.5\npipeline = ''\n", "profiles.p.pipeline"),
        ("[profiles.p]\ndose_fraction = 0.5\ndestinations = ['nowhere']\n", "unknown destination 'nowhere'"),
        ("[[sources]]\nae_title = 'M'\nprofile = 'none'\n", "unknown profile 'none'"),
        ("[[sources]]\nae_title = 'M'\nprofile = 'p'\nhosts = ['10.0.0.300']\n", "sources[0].hosts"),
        ("[[destinations]]\nname = 'pacs'\nhost = 'h'\n", "destinations[0]"),
        ("[detectors.X]\ngain = -1\nelectronic_noise = 3\noffset = 50\n", "detectors.X.gain"),
        ("[detectors.X]\ngain = 0.1\noffset = 50\n", "detectors.X.electronic_noise"),
        ("[retry]\nmultiplier = 0.5\n", "retry.multiplier"),
        ("[node\n", "not valid TOML"),
    ],
)
def test_bad_key_or_value_is_one_line_naming_it(config_file, text, expected):
    with pytest.raises(ConfigurationError) as info:
        load_config(config_file(text))
    message = str(info.value)
    print(message)
    assert expected in message
    assert "\n" not in message


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigurationError, match="cannot read configuration"):
        load_config(tmp_path / "absent.toml")
