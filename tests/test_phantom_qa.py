"""Phantom QA: rules, sessions in the job log, the seed paper's protocol numbers, the commands.

The protocol is checked against the detector physics: with X = rY + noise of variance
rλY + σe², the plain rescaled input (X − τ)/r has RN = mean(λ/r + σe²/(r²Y)) against the
full dose's mean(λ + σe²/Y), so its RN is about 1/r times the full dose's (a bit more with
electronic noise), and an unbiased B² near 0.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from dicom_node.cli import main
from dicom_node.config import PhantomRule, load_config
from dicom_node.errors import ConfigurationError, InputRefused
from dicom_node.imaging import raw_mammogram_dataset, read_mammogram, save_dataset
from dicom_node.joblog import JobLog, QaSessionStatus
from dicom_node.joblog.jobs import utcnow
from dicom_node.qa import phantom as qa
from dicom_node.restore.mask import breast_mask
from dicom_node.sim.acquisition import acquire
from dicom_node.sim.evaluation import mean_snr, mnse
from dicom_node.sim.phantom import make_phantom

from dicomtools import sim_noise_model

SHAPE = (128, 96)
FULL_MAS = 100.0
PHANTOM_SEED = 5
PITCH = 0.07  # mm: native resolution, where restoration is judged (as in test_mb_phantom)

CONFIG = """
[node]
data_dir = "data"

[database]
url = "sqlite:///{db}"

[profiles.qa]
pipeline = "gat-bm3d"
dose_fraction = 0.5
blend = "plain"  # the quickest: for the tests that need a restoration, not its quality

[profiles.spectral]
pipeline = "gat-bm3d"
dose_fraction = 0.5

[detectors.SIM-0001]
gain = 0.1
electronic_noise = 3.0
offset = 50.0

[detectors.SIM-0002]
gain = 0.1
electronic_noise = 3.0
offset = 50.0

[[phantom_qa]]
name = "monthly"
patient_id = "QA-PHANTOM"
quiet_minutes = 30
"""


def write_config(folder: Path) -> Path:
    path = folder / "node.toml"
    path.write_text(CONFIG.format(db=folder / "joblog.sqlite"))
    return path


def acquisition(dose: float, k: int, *, shape=SHAPE, exposure_mas: float | None = None, **options):
    """Realisation k of the phantom at `dose` (noise seeds kept apart per dose and k), as a dataset."""
    signal = make_phantom(shape, seed=PHANTOM_SEED, pixel_spacing_mm=PITCH).signal
    pixels = acquire(signal, sim_noise_model(), dose, rng_or_seed=np.random.default_rng([11, round(dose * 1000), k]))
    mas = FULL_MAS * dose if exposure_mas is None else exposure_mas
    return raw_mammogram_dataset(
        pixels, seed=PHANTOM_SEED, exposure_mas=mas, patient_id="QA-PHANTOM", pixel_spacing_mm=PITCH, **options
    )


def images(doses: dict[float, int], **options):
    return [read_mammogram(acquisition(dose, k, **options)) for dose, count in doses.items() for k in range(count)]


def strict_loads(text: str):
    def refuse(constant: str):
        raise AssertionError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


# --- rules ------------------------------------------------------------------------------------


def test_a_rule_matches_when_every_given_attribute_is_equal_spaces_ignored():
    ds = acquisition(1.0, 0)
    ds.StationName = "MAMMO-2 "
    ds.ProtocolName = "QA phantom"
    by_station = PhantomRule(name="station", station_name="MAMMO-2", protocol_name=" QA phantom")
    by_patient = PhantomRule(name="patient", patient_id="QA-PHANTOM")
    wrong_protocol = PhantomRule(name="other", station_name="MAMMO-2", protocol_name="screening")
    assert qa.match_rule([wrong_protocol, by_station, by_patient], ds) is by_station
    assert qa.match_rule([by_patient, by_station], ds) is by_patient
    assert qa.match_rule([wrong_protocol], ds) is None
    del ds.ProtocolName
    assert qa.match_rule([by_station], ds) is None
    assert qa.match_rule([], ds) is None


def test_exposures_within_two_percent_are_one_level_lowest_first():
    assert qa.exposure_levels([100, 50, 101.5, 50.5, 25, 103]) == [[4], [1, 3], [0, 2], [5]]


# --- sessions in the job log -------------------------------------------------------------------


@pytest.fixture
def log(tmp_path):
    return JobLog(f"sqlite:///{tmp_path / 'joblog.sqlite'}", max_attempts=2)


def received(log: JobLog, detector: str | None = "SIM-0001", *, decoded: bool = True, path: str = "x.dcm") -> int:
    job_id = log.record_received(
        sop_instance_uid=f"1.2.3.{utcnow().timestamp()}",
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2.1",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        calling_ae="MAMMO",
        called_ae="DOSENODE",
        peer_host="127.0.0.1",
        station_name="MAMMO-2",
        detector_serial=detector,
        profile="qa",
        input_path=path,
        input_sha256="0" * 64,
        input_bytes=1,
    )
    if decoded:
        log.record_stage(job_id, "decoded", 0.1)
    return job_id


def test_images_within_the_quiet_period_share_a_session_and_a_gap_opens_another(log):
    t0 = utcnow()
    first = log.mark_phantom_image(received(log), "monthly", 30, at=t0)
    assert log.mark_phantom_image(received(log), "monthly", 30, at=t0 + timedelta(minutes=25)) == first
    assert log.mark_phantom_image(received(log), "monthly", 30, at=t0 + timedelta(minutes=50)) == first
    late = log.mark_phantom_image(received(log), "monthly", 30, at=t0 + timedelta(minutes=81))
    assert late != first
    earlier = log.mark_phantom_image(received(log), "monthly", 30, at=t0 - timedelta(minutes=10))
    assert earlier == first  # an image processed out of order still joins its session
    session = log.get_qa_session(first)
    assert session.status == QaSessionStatus.open and session.station_name == "MAMMO-2"
    assert (session.first_image_at, session.last_image_at) == (t0 - timedelta(minutes=10), t0 + timedelta(minutes=50))
    assert len(log.qa_session_jobs(first)) == 4 and len(log.qa_session_jobs(late)) == 1


def test_another_detector_or_rule_opens_its_own_session_and_marking_twice_changes_nothing(log):
    t0 = utcnow()
    job = received(log)
    session = log.mark_phantom_image(job, "monthly", 30, at=t0)
    other_detector = log.mark_phantom_image(received(log, "SIM-0002"), "monthly", 30, at=t0)
    no_detector = log.mark_phantom_image(received(log, None), "monthly", 30, at=t0)
    other_rule = log.mark_phantom_image(received(log), "weekly", 30, at=t0)
    assert len({session, other_detector, no_detector, other_rule}) == 4
    assert log.mark_phantom_image(received(log, None), "monthly", 30, at=t0) == no_detector
    assert log.mark_phantom_image(job, "monthly", 30, at=t0 + timedelta(days=1)) == session
    snapshot = log.get_job(job)
    assert (snapshot.qa_rule, snapshot.qa_session_id) == ("monthly", session)
    assert [e.kind for e in log.events(job)].count("phantom-qa") == 1
    assert [s.detector_serial for s in log.qa_sessions(rule="monthly")].count("SIM-0002") == 1
    assert [s.id for s in log.qa_sessions(detector="SIM-0002")] == [other_detector]


def test_a_session_is_claimed_only_after_its_quiet_period_and_once_no_image_waits_to_be_decoded(log):
    t0 = utcnow()
    session = log.mark_phantom_image(received(log), "monthly", 30, at=t0 - timedelta(minutes=10))
    assert log.claim_qa_session("w", 60, {"monthly": 30}, now=t0 + timedelta(minutes=19)) is None
    assert log.claim_qa_session("w", 60, {"weekly": 1}, now=t0 + timedelta(hours=1)) is None  # rule not configured
    waiting = received(log, decoded=False)  # received at ≈ t0: it may be one of the session's
    assert log.claim_qa_session("w", 60, {"monthly": 30}, now=t0 + timedelta(hours=1)) is None
    log.record_stage(waiting, "decoded", 0.1)
    claimed = log.claim_qa_session("w", 60, {"monthly": 30}, now=t0 + timedelta(hours=1))
    assert claimed.id == session and claimed.status == QaSessionStatus.evaluating and claimed.attempts == 1
    assert log.claim_qa_session("w2", 60, {"monthly": 30}, now=t0 + timedelta(hours=1)) is None


def test_an_expired_lease_makes_the_session_claimable_again_up_to_the_attempts_cap(log):
    t0 = utcnow()
    session = log.mark_phantom_image(received(log), "monthly", 30, at=t0 - timedelta(hours=1))
    assert log.claim_qa_session("w1", 60, {"monthly": 30}, now=t0).id == session
    assert log.claim_qa_session("w2", 60, {"monthly": 30}, now=t0 + timedelta(seconds=30)) is None
    again = log.claim_qa_session("w2", 60, {"monthly": 30}, now=t0 + timedelta(seconds=61))
    assert again.id == session and again.lease_owner == "w2" and again.attempts == 2
    assert not log.qa_session_evaluated(session, "w1", {"stale": True})  # w1 lost it
    assert log.claim_qa_session("w3", 60, {"monthly": 30}, now=t0 + timedelta(seconds=200)) is None
    failed = log.get_qa_session(session)
    assert failed.status == QaSessionStatus.failed
    assert failed.error == "evaluator w2 stopped renewing its lease on 2 attempts"


def test_results_and_failures_are_stored_by_the_lease_holder_only(log):
    t0 = utcnow()
    session = log.mark_phantom_image(received(log), "monthly", 30, at=t0 - timedelta(hours=1))
    log.claim_qa_session("w", 600, {"monthly": 30})
    assert log.renew_qa_session(session, "w", 600) and not log.renew_qa_session(session, "other", 600)
    assert log.qa_session_failed(session, "w", "internal error: boom", retry=True)
    assert log.get_qa_session(session).status == QaSessionStatus.open
    log.claim_qa_session("w", 600, {"monthly": 30})
    assert log.qa_session_released(session, "w")
    assert log.get_qa_session(session).attempts == 1  # stepping aside does not count
    log.claim_qa_session("w", 600, {"monthly": 30})
    assert log.qa_session_evaluated(session, "w", {"doses": []})
    stored = log.get_qa_session(session)
    assert stored.status == QaSessionStatus.evaluated and stored.result == {"doses": []} and stored.error is None
    assert stored.evaluated_at is not None and not log.qa_session_failed(session, "w", "late")


# --- the protocol numbers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qa_config(tmp_path_factory):
    return load_config(write_config(tmp_path_factory.mktemp("qa")))


@pytest.fixture(scope="module")
def evaluated(qa_config):
    """4 full-dose images at 100 mAs, 3 at 50 mAs, 1 at 25 mAs; the restorations recorded on the way."""
    session = images({1.0: 4, 0.5: 3, 0.25: 1})
    restorations = []
    real = qa.restore_mammogram

    def recording(image, config, plan):
        processed = real(image, config, plan)
        restorations.append((plan, processed.dataset.pixel_array.astype(np.float64)))
        return processed

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(qa, "restore_mammogram", recording)
        result = qa.evaluate_session(session, qa_config, "spectral", rule="monthly")
    print(json.dumps(result, indent=1))
    offset = sim_noise_model().offset
    full = np.stack([image.pixels for image in session[:4]]).astype(np.float64) - offset
    low = np.stack([image.pixels for image in session[4:7]]).astype(np.float64) - offset
    mask = breast_mask(full.mean(axis=0) + offset, sim_noise_model())
    return result, full, low, mask, restorations


def expected_rn(dose: float, mask: np.ndarray) -> float:
    """RN of (X − τ)/r against the noise-free signal: mean(λ/r + σe²/(r²Y)) in the mask."""
    noise = sim_noise_model()
    signal = make_phantom(SHAPE, seed=PHANTOM_SEED, pixel_spacing_mm=PITCH).signal[mask]
    return float(np.mean(noise.gain / dose + noise.electronic_noise**2 / (dose**2 * signal)))


def test_the_full_dose_reference_has_the_detector_s_noise(evaluated):
    result, full, _, mask, _ = evaluated
    assert result["full_dose"]["exposure_mas"] == FULL_MAS and result["full_dose"]["images"] == 4
    assert result["full_dose"]["rn"] == pytest.approx(expected_rn(1.0, mask), rel=0.06)


def test_the_rescaled_half_dose_has_twice_the_noise_and_no_bias(evaluated):
    result, _, _, mask, _ = evaluated
    (half,) = result["doses"]
    assert half["dose_fraction"] == 0.5 and half["exposure_mas"] == 50 and half["images"] == 3
    rescaled = half["rescaled"]
    assert rescaled["rn"] == pytest.approx(expected_rn(0.5, mask), rel=0.06)
    ratio = rescaled["rn"] / result["full_dose"]["rn"]
    assert ratio == pytest.approx(expected_rn(0.5, mask) / expected_rn(1.0, mask), rel=0.08)
    assert 1.9 < ratio < 2.5  # 1/r, plus the electronic noise's 1/r²
    assert abs(rescaled["b2"]) < 0.012  # unbiased: only the estimate's own scatter
    assert rescaled["mnse"] == pytest.approx(rescaled["rn"] + rescaled["b2"])


def test_restoration_lowers_the_noise_towards_full_dose(evaluated):
    result, _, _, _, restorations = evaluated
    (half,) = result["doses"]
    restored = half["restored"]
    assert restored["rn"] < 0.75 * half["rescaled"]["rn"]
    assert half["restored_vs_full_dose_rn"] < 1.5  # towards the full-dose noise (the spectral blend's aim)
    assert restored["snr"] > half["rescaled"]["snr"]
    assert half["restored_vs_full_dose_rn"] == pytest.approx(restored["rn"] / result["full_dose"]["rn"])
    assert half["restored_vs_full_dose_mnse"] == pytest.approx(restored["mnse"] / result["full_dose"]["rn"])
    # each half-dose image restored once, with the profile's options and the measured dose fraction
    assert [(plan.pipeline, plan.dose_fraction, dict(plan.options)) for plan, _ in restorations] == [
        ("gat-bm3d", 0.5, {})
    ] * 3
    assert result["pipeline"] == "gat-bm3d" and result["options"]["blend"] == "spectral"


def test_the_figures_are_the_evaluation_protocol_s_on_the_same_arrays(evaluated):
    result, full, low, mask, restorations = evaluated
    offset = sim_noise_model().offset
    assert result["mask_pixels"] == int(mask.sum())
    (half,) = result["doses"]
    restored = np.stack([pixels for _, pixels in restorations]) - offset
    for figures, stack in ((half["rescaled"], low / 0.5), (half["restored"], restored)):
        direct = mnse(stack, full, mask)
        assert (figures["rn"], figures["b2"], figures["mnse"]) == pytest.approx((direct.rn, direct.b2, direct.mnse))
        assert figures["snr"] == pytest.approx(mean_snr(stack, mask))
    assert result["full_dose"]["rn"] == pytest.approx(mnse(full, full, mask).rn)
    assert result["full_dose"]["snr"] == pytest.approx(mean_snr(full, mask))


def test_the_result_is_strict_json_and_a_single_image_level_is_skipped_with_the_reason(evaluated):
    result = evaluated[0]
    assert strict_loads(json.dumps(result, allow_nan=False))["rule"] == "monthly"
    assert result["detector"] == "SIM-0001" and result["kvp"] == 29
    assert result["skipped"] == [
        {
            "exposure_mas": 25.0,
            "images": 1,
            "reason": "one image only: residual noise needs at least 2 at each exposure",
        }
    ]


@pytest.mark.parametrize(
    ("session", "error", "fragment"),
    [
        (lambda: images({1.0: 2, 0.5: 1}) + images({0.5: 1}, shape=(128, 112)), InputRefused, "different sizes"),
        (lambda: images({1.0: 3}), InputRefused, "all 3 images have the same exposure (100 mAs)"),
        (lambda: images({1.0: 1, 0.5: 2}), InputRefused, "only one image at the full-dose exposure"),
        (lambda: images({1.0: 2}) + images({0.5: 2}, kvp=31.0), InputRefused, "several tube voltages"),
        (
            lambda: images({1.0: 2}) + images({0.5: 2}, detector_serial="SIM-0002"),
            InputRefused,
            "several detectors",
        ),
    ],
)
def test_sessions_that_cannot_be_evaluated_are_refused_with_the_reason(qa_config, session, error, fragment):
    with pytest.raises(error, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        qa.evaluate_session(session(), qa_config, "qa")


def test_an_image_without_a_recorded_exposure_or_an_unknown_profile_is_refused(qa_config):
    session = images({1.0: 2, 0.5: 2})
    with pytest.raises(ConfigurationError, match="profile 'nope' is not in the configuration"):
        qa.evaluate_session(session, qa_config, "nope")
    del session[1].dataset.Exposure, session[1].dataset.ExposureInuAs
    session[1] = read_mammogram(session[1].dataset)
    with pytest.raises(InputRefused, match="records no exposure"):
        qa.evaluate_session(session, qa_config, "qa")


# --- the node: due sessions evaluated and stored ----------------------------------------------------


def node_session(folder: Path, log: JobLog, doses: dict[float, int], at) -> int:
    """Phantom images written as spooled inputs, received, decoded and marked as one session."""
    session = 0
    for dose, count in doses.items():
        for k in range(count):
            path = folder / f"dose{dose}-{k}.dcm"
            save_dataset(acquisition(dose, k), path)
            session = log.mark_phantom_image(received(log, path=str(path)), "monthly", 30, at=at)
    return session


def test_a_due_session_is_evaluated_and_stored_and_trended(tmp_path, qa_config):
    log = JobLog(qa_config.database_url, qa_config.worker.max_attempts)
    session = node_session(tmp_path, log, {1.0: 2, 0.5: 2}, at=utcnow() - timedelta(hours=1))
    assert qa.evaluate_due_sessions(qa_config, log, "w") == 1
    stored = log.get_qa_session(session)
    assert stored.status == QaSessionStatus.evaluated and stored.error is None, stored.error
    (half,) = stored.result["doses"]
    assert half["restored"]["rn"] < half["rescaled"]["rn"] and stored.result["rule"] == "monthly"
    assert qa.evaluate_due_sessions(qa_config, log, "w") == 0  # nothing else is due
    (row,) = qa.trend(log, detector="SIM-0001")
    assert row["id"] == session and row["status"] == "evaluated" and row["doses"][0]["restored"] == half["restored"]
    assert qa.trend(log, detector="SIM-0002") == []


def test_a_session_that_cannot_be_evaluated_fails_with_a_readable_error(tmp_path, qa_config):
    log = JobLog(f"sqlite:///{tmp_path / 'j.sqlite'}")
    one_level = node_session(tmp_path, log, {1.0: 2}, at=utcnow() - timedelta(hours=2))
    gone_file = received(log, "SIM-0002", path=str(tmp_path / "gone.dcm"))
    gone = log.mark_phantom_image(gone_file, "monthly", 30, at=utcnow() - timedelta(hours=1))
    assert qa.evaluate_due_sessions(qa_config, log, "w") == 1
    failed = log.get_qa_session(one_level)
    assert failed.status == QaSessionStatus.failed and failed.attempts == 1
    assert failed.error.startswith("all 2 images have the same exposure (100 mAs)")
    assert qa.evaluate_due_sessions(qa_config, log, "w") == 1
    failed = log.get_qa_session(gone)
    assert failed.status == QaSessionStatus.failed
    assert failed.error.startswith(f"the input file of job {gone_file} is gone")


def test_an_evaluation_steps_aside_for_clinical_images(tmp_path, qa_config):
    log = JobLog(f"sqlite:///{tmp_path / 'j.sqlite'}")
    session = node_session(tmp_path, log, {1.0: 2, 0.5: 2}, at=utcnow() - timedelta(hours=1))
    assert log.jobs_due() == 4  # the session's own images, never processed in this test: work a worker could do
    assert qa.evaluate_due_sessions(qa_config, log, "w", yield_to=lambda: log.jobs_due() > 0) == 0
    back = log.get_qa_session(session)
    assert back.status == QaSessionStatus.open and back.attempts == 0 and back.lease_owner is None
    assert back.result is None and back.error is None


# --- the commands ----------------------------------------------------------------------------------


def run(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out, err = capsys.readouterr()
    return info.value.code, out, err


@pytest.fixture(scope="module")
def phantom_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("phantom")
    (folder / "half").mkdir()
    for k in range(2):
        save_dataset(acquisition(1.0, k), folder / f"full-{k}.dcm")
        save_dataset(acquisition(0.5, k), folder / "half" / f"half-{k}.dcm")
    (folder / "notes.txt").write_text("not DICOM")
    return folder


def test_qa_phantom_prints_strict_json_and_a_readable_table(capsys, tmp_path, phantom_folder):
    config = str(write_config(tmp_path))
    code, out, err = run(capsys, "qa-phantom", str(phantom_folder), "--json", "--config", config)
    assert code == 0, err
    report = strict_loads(out)
    assert report["skipped_files"] == 1 and "skipped 1 files" in err
    (session,) = report["sessions"]
    assert session["detector"] == "SIM-0001" and session["full_dose"]["images"] == 2
    (half,) = session["doses"]
    assert half["dose_fraction"] == 0.5 and set(half["restored"]) == {"rn", "b2", "mnse", "snr"}
    assert half["restored"]["rn"] < half["rescaled"]["rn"]

    code, out, err = run(capsys, "qa-phantom", str(phantom_folder), "--config", config, "--profile", "qa")
    assert code == 0, err
    print(out)
    lines = out.splitlines()
    assert lines[1].split() == ["GROUP", "DOSE", "mAs", "IMAGES", "RN", "%", "B²", "%", "MNSE", "%", "SNR"]
    rows = {line.split()[0]: line.split() for line in lines[2:5]}
    assert set(rows) == {"full", "restored", "rescaled"}
    assert float(rows["restored"][4]) == pytest.approx(100 * half["restored"]["rn"], abs=0.01)
    assert float(rows["rescaled"][6]) == pytest.approx(100 * half["rescaled"]["mnse"], abs=0.01)
    assert "restored at 50% dose: MNSE" in out


def assert_one_line_error(code: int, err: str, fragment: str) -> None:
    print(err)
    assert code != 0 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and fragment in err


@pytest.mark.parametrize(
    ("doses", "arguments", "fragment"),
    [
        ({}, (), "holds no raw (For Processing) mammograms"),
        ({1.0: 2}, (), "all 2 images have the same exposure"),
        ({1.0: 1, 0.5: 2}, (), "only one image at the full-dose exposure"),
        ({1.0: 2, 0.5: 2}, ("--profile", "nope"), "unknown profile 'nope'"),
    ],
)
def test_qa_phantom_user_errors_are_one_line(capsys, tmp_path, doses, arguments, fragment):
    folder = tmp_path / "in"
    folder.mkdir()
    for dose, count in doses.items():
        for k in range(count):
            save_dataset(acquisition(dose, k), folder / f"{dose}-{k}.dcm")
    code, _, err = run(capsys, "qa-phantom", str(folder), "--config", str(write_config(tmp_path)), *arguments)
    assert_one_line_error(code, err, fragment)


def test_qa_sessions_lists_each_detector_s_sessions_over_time(capsys, tmp_path):
    config = write_config(tmp_path)
    log = JobLog(load_config(config).database_url)
    t0 = utcnow() - timedelta(days=60)
    figures = {"rn": 0.12, "b2": 0.004, "mnse": 0.124, "snr": 90.0}
    for month in range(2):
        session = log.mark_phantom_image(received(log), "monthly", 30, at=t0 + timedelta(days=30 * month))
        log.claim_qa_session("w", 60, {"monthly": 30})
        result = {
            "full_dose": {"exposure_mas": 100.0, "images": 4, "rn": 0.11, "snr": 95.0},
            "doses": [
                {
                    "dose_fraction": 0.5,
                    "exposure_mas": 50.0,
                    "images": 3,
                    "restored": {**figures, "rn": figures["rn"] + month / 100},
                    "rescaled": {"rn": 0.23, "b2": 0.001, "mnse": 0.231, "snr": 60.0},
                    "restored_vs_full_dose_mnse": 1.1,
                    "restored_vs_full_dose_rn": 1.1,
                }
            ],
        }
        assert log.qa_session_evaluated(session, "w", result)
    log.mark_phantom_image(received(log, "SIM-0002"), "monthly", 30)

    code, out, err = run(capsys, "qa-sessions", "--detector", "SIM-0001", "--json", "--config", str(config))
    assert code == 0, err
    rows = strict_loads(out)
    assert [row["doses"][0]["restored"]["rn"] for row in rows] == [0.12, 0.13]  # oldest first
    assert rows[0]["first_image_at"] < rows[1]["first_image_at"]

    code, out, err = run(capsys, "qa-sessions", "--config", str(config))
    assert code == 0, err
    print(out)
    lines = out.splitlines()
    assert lines[0].split()[:6] == ["SESSION", "FIRST", "IMAGE", "(UTC)", "DETECTOR", "RULE"]
    assert [line.split()[3] for line in lines[1:]] == ["SIM-0001", "SIM-0001", "SIM-0002"]
    assert "13.00" in lines[2] and "open" in lines[3]
