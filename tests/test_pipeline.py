"""The plan of a restoration (profiles checked against the registry) and how failures become job states."""

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dicom_node.config import load_config
from dicom_node.errors import ConfigurationError, InputRefused, Unavailable
from dicom_node.joblog import JobSnapshot
from dicom_node.joblog.tables import JobStatus
from dicom_node.pipeline.processing import Plan, check_profiles
from dicom_node.pipeline.worker import outcome_of

REPO = Path(__file__).resolve().parent.parent


def config_with_profile(tmp_path, lines: str):
    path = tmp_path / "node.toml"
    path.write_text(f"[profiles.p]\ndose_fraction = 0.5\n{lines}")
    return load_config(path)


def test_example_and_embedded_profiles_name_registered_restorers_with_valid_options():
    for config in (load_config(), load_config(REPO / "config" / "example.toml")):
        check_profiles(config)  # raises on any problem


@pytest.mark.parametrize(
    "lines, expected",
    [
        ("pipeline = 'magic'\n", "profiles.p: unknown restorer 'magic'; available: deep, gat-bm3d"),
        ("blendd = 'plain'\n", "profiles.p: blendd: unknown option for restorer gat-bm3d"),
        ("blend = 'sharp'\n", "profiles.p: blend: Input should be 'plain', 'noise-aware' or 'spectral'"),
        ("pipeline = 'deep'\nmargin = 40\n", "profiles.p: margin: unknown option for restorer deep"),
        (
            "pipeline = 'deep'\nblend = 'sharp'\n",
            "profiles.p: blend: Input should be '', 'plain', 'noise-aware' or 'spectral'",
        ),
        ("pipeline = 'deep'\ntile = 0\n", "profiles.p: tile: Input should be greater than 0"),
    ],
    ids=["unknown-pipeline", "unknown-option", "bad-blend", "option-of-another-restorer", "bad-deep-blend", "bad-tile"],
)
def test_profile_problems_are_one_line_naming_the_profile_and_key(tmp_path, lines, expected):
    config = config_with_profile(tmp_path, lines)
    with pytest.raises(ConfigurationError) as info:
        check_profiles(config)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_profile_keys_beyond_the_schema_are_the_restorers_options(tmp_path):
    config = config_with_profile(tmp_path, "pipeline = 'deep'\nmodel = 'x'\n")
    plan = Plan.of_profile("p", config.profiles["p"])
    assert plan == Plan("deep", 0.5, "p", {"model": "x"})


def job(attempts: int) -> JobSnapshot:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    fields = {name: None for name in JobSnapshot.__dataclass_fields__}
    return replace(JobSnapshot(**fields), id=1, status=JobStatus.processing, attempts=attempts, received_at=now)


NOW = datetime(2026, 1, 1, 0, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    "error",
    [InputRefused("not a mammogram"), ConfigurationError("no detector entry")],
    ids=["input-refused", "configuration"],
)
def test_refused_input_and_wrong_configuration_fail_the_job_at_once(error):
    outcome = outcome_of(error, job(1), load_config(), NOW)
    assert outcome.retry_at is None and outcome.error == str(error) and not outcome.traceback


def test_an_unavailable_resource_is_retried_on_the_policy():
    outcome = outcome_of(Unavailable("disk full"), job(5), load_config(), NOW)
    assert outcome.retry_at is not None and outcome.retry_at > NOW and not outcome.traceback


def test_an_internal_error_is_retried_up_to_max_attempts_then_failed_as_internal():
    config = load_config()
    limit = config.worker.max_attempts
    first = outcome_of(ValueError("operands could not be broadcast"), job(1), config, NOW)
    assert first.retry_at is not None and first.traceback
    assert first.error == "internal error: ValueError: operands could not be broadcast"
    last = outcome_of(ValueError("operands could not be broadcast"), job(limit), config, NOW)
    assert last.retry_at is None and last.traceback
    assert last.error.startswith("internal error: ValueError") and f"gave up after {limit} attempts" in last.error
    assert first.retry_at - NOW <= timedelta(seconds=config.retry.initial_s * (1 + config.retry.jitter))


def test_an_unknown_detector_is_refused_offering_flags_only_where_there_are_flags(tmp_path):
    from dicom_node.imaging import read_mammogram
    from dicom_node.pipeline.processing import NoiseOverrides, restore_mammogram

    from dicomtools import low_dose_mammogram

    image = read_mammogram(low_dose_mammogram(tmp_path / "in.dcm", seed=3, shape=(64, 64), detector_serial="SN-NEW"))
    plan = Plan("gat-bm3d", 0.5, "p")
    with pytest.raises(ConfigurationError) as worker:
        restore_mammogram(image, load_config(), plan)
    with pytest.raises(ConfigurationError) as command_line:
        restore_mammogram(image, load_config(), plan, overrides=NoiseOverrides(gain=0.1))
    assert "add [detectors.SN-NEW]" in str(worker.value) and "--gain" not in str(worker.value)
    assert str(command_line.value).endswith("or pass --electronic-noise, --offset")


def test_warm_up_loads_each_profiles_restorer_and_names_a_broken_one(tmp_path):
    """A worker loads libraries and models before its first job; a profile that cannot restore is
    one line, and the others still warm up."""
    from dicom_node.pipeline.processing import warm_up
    from dicom_node.restore.deep.store import _cached_model

    _cached_model.cache_clear()
    config = config_with_profile(tmp_path, "pipeline = 'deep'\n")
    assert warm_up(config) == []
    assert _cached_model.cache_info().currsize == 1  # the default model for the dose, loaded
    broken = config_with_profile(tmp_path, "pipeline = 'deep'\nmodel = 'missing'\n")
    [problem] = warm_up(broken)
    assert problem.startswith("profile 'p' is not ready: ConfigurationError: no model 'missing'")
