"""The configuration loader: defaults, the example file, and one-line errors naming the key."""

from pathlib import Path

import numpy as np
import pytest

from dicom_node.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def test_embedded_defaults_are_valid_and_name_the_simulated_detector():
    config = load_config()
    assert config.path is None
    assert config.node.ae_title == "DOSENODE"
    assert "SIM-0001" in config.detectors
    assert config.detector_for("UNKNOWN-SERIAL") is None  # no guessing for uncalibrated detectors
    assert config.database_url.startswith("sqlite:///")


def test_example_config_is_valid():
    config = load_config(REPO / "config" / "example.toml")
    assert config.profiles["half-dose"].dose_fraction == 0.5
    assert [d.name for d in config.destinations] == ["pacs", "outbox"]
    assert config.resolve(Path("outbox")) == REPO / "config" / "outbox"


def test_environment_variable_names_the_file(tmp_path, monkeypatch):
    path = write(tmp_path, '[node]\nae_title = "FROMENV"\n')
    monkeypatch.setenv("DICOM_NODE_CONFIG", str(path))
    assert load_config().node.ae_title == "FROMENV"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[node]\nport = 70000\n", "node.port"),
        ("[node]\naetitle = 'X'\n", "node.aetitle: unknown key"),
        ("[node]\nae_title = 'MUCH_TOO_LONG_AE_TITLE'\n", "node.ae_title"),
        ("[profiles.p]\ndose_fraction = 1.5\n", "profiles.p.dose_fraction"),
        ("[profiles.p]\ndose_fraction = 0.5\npipeline = 'magic'\n", "profiles.p.pipeline"),
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
def test_bad_key_or_value_is_one_line_naming_it(tmp_path, text, expected):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    message = str(info.value)
    print(message)
    assert expected in message
    assert "\n" not in message


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_config(tmp_path / "absent.toml")


def test_detector_lookup_falls_back_to_default(tmp_path):
    config = load_config(
        write(
            tmp_path,
            "[detectors.default]\ngain = 0.2\nelectronic_noise = 2\noffset = 40\n"
            "[detectors.SN1]\ngain = 0.1\nelectronic_noise = 3\noffset = 50\n",
        )
    )
    assert config.detector_for("SN1")[0] == "SN1"
    assert config.detector_for("other")[0] == "default"
    assert config.noise_model("default").gain == 0.2


def test_gain_map_is_loaded_relative_to_the_file_and_checked(tmp_path):
    np.save(tmp_path / "map.npy", np.full((4, 5), 0.12))
    config = load_config(
        write(tmp_path, "[detectors.SN1]\ngain = 0.1\nelectronic_noise = 3\noffset = 50\ngain_map = 'map.npy'\n")
    )
    assert config.noise_model("SN1", (4, 5)).gain.shape == (4, 5)
    with pytest.raises(ConfigError, match="map is 4×5 but the image is 8×8"):
        config.noise_model("SN1", (8, 8))


def test_retry_policy_grows_geometrically_and_gives_up_after_max_age():
    from datetime import datetime, timedelta, timezone

    from dicom_node.config import RetryPolicy

    policy = RetryPolicy(initial_s=10, multiplier=3, jitter=0, max_delay_s=100, max_age_h=1)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    delays = [(policy.retry_at(n, start, start) - start).total_seconds() for n in (1, 2, 3, 4)]
    assert delays == [10, 30, 90, 100]
    assert policy.retry_at(1, start, start + timedelta(minutes=59, seconds=55)) is None
    jittery = RetryPolicy(initial_s=100, jitter=0.2)
    spread = {(jittery.retry_at(1, start, start) - start).total_seconds() for _ in range(50)}
    assert len(spread) > 1 and all(80 <= d <= 120 for d in spread)
