"""The configuration loader: defaults, the example file, one-line errors naming the key, relative paths."""

import json
from pathlib import Path

import numpy as np
import pytest

from dicom_node.cli import main
from dicom_node.config import load_config
from dicom_node.detectors import detector_noise
from dicom_node.errors import ConfigurationError
from dicom_node.forward.destinations import destination_named
from dicom_node.joblog import JobLog

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
        ("[node]\nfile_mode = 640\n", "node.file_mode: must be an octal string"),
        ("[node]\nfile_mode = '0689'\n", "node.file_mode: must be an octal string"),
        ("[node]\nfile_mode = 'rw-r-----'\n", "node.file_mode: must be an octal string"),
        ("[node]\nfile_mode = '0240'\n", "node.file_mode: the node must be able to read its own files"),
        ("[node]\nfile_mode = '0646'\n", "node.file_mode: files of patients' images must not be writable by everyone"),
        ("[database]\nurl = 'not a url'\n", "database.url: not a database URL"),
        ("path = '/elsewhere/node.toml'\n", "path: unknown key"),
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


@pytest.mark.parametrize("text, mode", [("", 0o640), ("file_mode = '0600'", 0o600), ("file_mode = '644'", 0o644)])
def test_file_mode_is_an_octal_string_defaulting_to_group_readable(config_file, text, mode):
    assert load_config(config_file(f"[node]\n{text}\n")).node.file_mode == mode


SITE = """
[node]
data_dir = "data"
model_dir = "models"

[database]
url = "sqlite:///db/joblog.sqlite"

[[destinations]]
name = "outbox"
folder = "outbox"

[detectors.SN1]
gain = 0.1
electronic_noise = 3
offset = 50
gain_map = "maps/gain.npy"
"""


@pytest.fixture
def site(tmp_path, monkeypatch) -> Path:
    """site/node.toml with relative paths everywhere; the current folder is another one, elsewhere/."""
    (tmp_path / "site" / "maps").mkdir(parents=True)
    (tmp_path / "site" / "node.toml").write_text(SITE)
    np.save(tmp_path / "site" / "maps" / "gain.npy", np.full((4, 3), 0.1))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    return tmp_path / "site"


def test_relative_paths_are_relative_to_the_configuration_file(site):
    config = load_config(Path("../site/node.toml"))
    assert config.data_dir == site / "data"
    assert config.model_dir == site / "models"
    assert config.database_url == f"sqlite:///{site / 'db' / 'joblog.sqlite'}"
    assert config.joblog_file == site / "db" / "joblog.sqlite"
    assert destination_named(config, "outbox").folder == site / "outbox"
    assert detector_noise(config, "SN1").gain.shape == (4, 3)


def received_job(joblog: JobLog, uid: str) -> int:
    """A job as the receiver records it, for the commands that read the job log."""
    return joblog.record_received(
        sop_instance_uid=uid,
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2.1",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        calling_ae="MAMMO1",
        called_ae="DOSENODE",
        peer_host="127.0.0.1",
        station_name=None,
        detector_serial="SIM-0001",
        profile="half-dose",
        input_path="/spool/1.dcm",
        input_sha256="0" * 64,
        input_bytes=1000,
    )


def test_jobs_from_another_folder_read_the_configured_job_log(capsys, site):
    received_job(JobLog(f"sqlite:///{site / 'db' / 'joblog.sqlite'}"), "1.2.826.0.1.3680043.8.498.1")
    with pytest.raises(SystemExit) as info:
        main(["jobs", "--json", "--config", "../site/node.toml"])
    out, err = capsys.readouterr()
    assert info.value.code == 0, err
    assert [job["sop_instance_uid"] for job in json.loads(out)] == ["1.2.826.0.1.3680043.8.498.1"]
    assert list(Path.cwd().iterdir()) == []  # no job log made where the command ran


def test_selftest_from_a_folder_without_the_job_log_says_so(capsys, tmp_path, monkeypatch):
    """The embedded defaults' data_dir is the current folder's data/: a selftest from elsewhere refuses
    before sending, instead of reading (and creating) an empty job log."""
    monkeypatch.delenv("DICOM_NODE_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["selftest"])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.strip() == (
        f"dicom-node: error: no job log at {tmp_path / 'data' / 'joblog.sqlite'}: the node has not run with the "
        "embedded defaults (data_dir relative to the current folder); run the command where `dicom-node serve` "
        "runs, or pass its --config"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_dashboard_password_pasted_as_its_hash_is_refused_without_echoing_it():
    from dicom_node.config import parse_config

    with pytest.raises(ConfigurationError) as info:
        parse_config({"dashboard": {"users": {"ann": {"role": "qa", "password_hash": "hunter2secret"}}}})
    assert "dashboard.users.ann.password_hash: not a line from `dicom-node hash-password`" in str(info.value)
    assert "hunter2secret" not in str(info.value)
    with pytest.raises(ConfigurationError, match="an enabled dashboard needs at least one user"):
        parse_config({"dashboard": {"enabled": True}})
