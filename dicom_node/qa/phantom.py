"""Phantom QA: a phantom imaged repeatedly at full and reduced exposures, evaluated with the seed
paper's protocol and trended per detector.

A QA physicist images the same phantom, in the same position, several times at the clinical
exposure and several times at one or more reduced exposures. Images that match a `[[phantom_qa]]`
rule (`match_rule`) are restored and forwarded like any other, and also grouped into a QA session
per rule and detector (`JobLog.mark_phantom_image`); once the session has been quiet for the
rule's `quiet_minutes`, `evaluate_due_sessions` evaluates it and stores the result, which
`dicom-node qa-sessions` and the dashboard trend. `dicom-node qa-phantom` does the same offline on
a folder of files.

The evaluation (`evaluate_session`, science.md's protocol, `dicom_node.sim.evaluation`): the
images at the highest exposure (mAs) are the full-dose reference, and their mean the pseudo ground
truth; every lower exposure is a reduced dose with r = its mAs / the full mAs (exposures within
2 % are one level). Each reduced-dose image is restored with the profile its source uses, told
dose fraction r, and the restored images' RN, B² and MNSE against the full-dose mean are set
beside those of the plain rescaled input ((z − τ)/r) and the full-dose images' own RN.

Assumption: the images are aligned (same phantom, same position, no movement between
exposures); the protocol's variance over realisations is taken pixel by pixel, so a phantom moved
between exposures shows as noise and bias. Images of different sizes are refused.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from dicom_node.config import Config, PhantomRule
from dicom_node.console import strict_json
from dicom_node.errors import ConfigurationError, InputRefused, NodeError
from dicom_node.imaging import MammoImage, read_mammogram
from dicom_node.joblog import JobLog, QaSessionSnapshot
from dicom_node.pipeline.processing import Plan, resolve_noise, restore_mammogram
from dicom_node.restore.mask import breast_mask
from dicom_node.sim.evaluation import mean_snr, mnse

log = logging.getLogger("dicom_node.qa.phantom")

SAME_LEVEL = 0.02
"""Exposures within 2 % of a level's lowest are one level (an AEC may vary the mAs slightly)."""

_RULE_ATTRIBUTES = (("patient_id", "PatientID"), ("station_name", "StationName"), ("protocol_name", "ProtocolName"))


def match_rule(rules: Sequence[PhantomRule], dataset: Dataset) -> PhantomRule | None:
    """The first rule whose every given attribute equals the image's (surrounding spaces ignored)."""
    for rule in rules:
        wanted = [(keyword, getattr(rule, field)) for field, keyword in _RULE_ATTRIBUTES]
        if all(
            str(dataset.get(keyword) or "").strip() == value.strip() for keyword, value in wanted if value is not None
        ):
            return rule
    return None


def exposure_levels(exposures: Sequence[float]) -> list[list[int]]:
    """Indices of `exposures` grouped into levels (`SAME_LEVEL`), lowest exposure first."""
    levels: list[list[int]] = []
    for index in sorted(range(len(exposures)), key=lambda i: exposures[i]):
        if levels and exposures[index] <= exposures[levels[-1][0]] * (1 + SAME_LEVEL):
            levels[-1].append(index)
        else:
            levels.append([index])
    return levels


def evaluate_session(
    images: Sequence[MammoImage],
    config: Config,
    profile_name: str,
    *,
    rule: str | None = None,
    on_image: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """The protocol's figures of one session's images (one detector), as a strict-JSON-able dict.

    Raises InputRefused when the images cannot make a session (the text says what to image) and
    ConfigurationError for an unknown profile or detector. `on_image` is called after each
    restoration (the node renews its lease there). Figures are fractions of the signal; a figure
    that cannot be computed is None.
    """
    started = time.perf_counter()
    profile = config.profiles.get(profile_name)
    if profile is None:
        known = ", ".join(sorted(config.profiles)) or "none"
        raise ConfigurationError(f"profile {profile_name!r} is not in the configuration (profiles: {known})")
    _check_images(images)
    exposures = [_exposure(image) for image in images]
    levels = exposure_levels(exposures)
    full, reduced = levels[-1], levels[:-1]
    full_mas = float(np.mean([exposures[i] for i in full]))
    if not reduced:
        raise InputRefused(
            f"all {len(images)} images have the same exposure ({full_mas:g} mAs): a session needs images at "
            "the full dose and at least one reduced exposure"
        )
    if len(full) < 2:
        raise InputRefused(
            f"only one image at the full-dose exposure ({full_mas:g} mAs): the reference needs at least 2 "
            "(the protocol uses 10)"
        )
    noise, _ = resolve_noise(config, images[0])
    offset = noise.offset
    reference = np.stack([images[i].pixels for i in full]).astype(np.float64) - offset
    truth = reference.mean(axis=0)
    mask = breast_mask(truth + offset, noise) & (truth > 0)
    if not mask.any():
        raise InputRefused("the full-dose images have no phantom region with signal above the detector offset")

    result: dict[str, Any] = {
        "rule": rule,
        "detector": images[0].params.detector_serial,
        "station": images[0].params.station_name,
        "kvp": images[0].params.kvp,
        "profile": profile_name,
        "pipeline": profile.pipeline,
        "options": profile.restorer_options,
        "model": None,
        "offset": offset,
        "mask_pixels": int(mask.sum()),
        "full_dose": {
            "exposure_mas": full_mas,
            "images": len(full),
            "rn": _finite(mnse(reference, reference, mask).rn),
            "snr": _finite(mean_snr(reference, mask)),
        },
        "doses": [],
        "skipped": [],
    }
    for level in reversed(reduced):  # the highest reduced dose first
        level_mas = float(np.mean([exposures[i] for i in level]))
        r = level_mas / full_mas
        if len(level) < 2:
            result["skipped"].append(
                {
                    "exposure_mas": level_mas,
                    "images": 1,
                    "reason": "one image only: residual noise needs at least 2 at each exposure",
                }
            )
            continue
        low = np.stack([images[i].pixels for i in level]).astype(np.float64) - offset
        entry: dict[str, Any] = {
            "dose_fraction": r,
            "exposure_mas": level_mas,
            "images": len(level),
            "restored": None,
            "rescaled": _figures(low / r, reference, mask),
            "restored_vs_full_dose_mnse": None,
            "restored_vs_full_dose_rn": None,
        }
        plan = Plan(profile.pipeline, r, profile_name, profile.restorer_options)
        try:
            restored = []
            for i in level:
                processed = restore_mammogram(images[i], config, plan)
                restored.append(processed.dataset.pixel_array.astype(np.float64) - offset)  # what PACS gets
                provenance = processed.provenance  # the options and model actually used
                result["options"] = dict(provenance.options)
                if provenance.model_name:
                    result["model"] = {"name": provenance.model_name, "digest": provenance.model_digest}
                if on_image is not None:
                    on_image()
        except (InputRefused, ConfigurationError) as exc:  # e.g. no model for this dose: the rest still counts
            entry["error"] = str(exc)
        else:
            figures = _figures(np.stack(restored), reference, mask)
            entry["restored"] = figures
            entry["restored_vs_full_dose_mnse"] = _ratio(figures["mnse"], result["full_dose"]["rn"])
            entry["restored_vs_full_dose_rn"] = _ratio(figures["rn"], result["full_dose"]["rn"])
        result["doses"].append(entry)
    result["seconds"] = time.perf_counter() - started
    return result


def evaluate_due_sessions(
    config: Config, joblog: JobLog, owner: str, *, yield_to: Callable[[], bool] | None = None
) -> int:
    """Evaluate the QA session due first, if any, and store its result or its error; returns how
    many sessions were evaluated or failed (0 or 1).

    Bounded: the session is leased (`[worker] lease_s`, renewed after each restoration) and
    claimed at most `[worker] max_attempts` times. Refused images and configuration errors fail it
    at once; an internal error is retried up to the cap. `yield_to` is asked after each image: when
    it says True (clinical images are waiting), the session is given back, the attempt not counted.
    """
    quiet = {rule.name: rule.quiet_minutes for rule in config.phantom_qa}
    if not quiet:
        return 0
    lease_s = config.worker.lease_s
    session = joblog.claim_qa_session(owner, lease_s, quiet)
    if session is None:
        return 0
    log.info(
        "QA session %d (%s, detector %s): evaluating, attempt %d",
        session.id,
        session.rule,
        session.detector_serial,
        session.attempts,
    )

    def on_image() -> None:
        if not joblog.renew_qa_session(session.id, owner, lease_s):
            raise _LeaseLost
        if yield_to is not None and yield_to():
            raise _StepAside

    try:
        images, profile = _session_images(joblog, session)
        result = evaluate_session(images, config, profile, rule=session.rule, on_image=on_image)
    except _StepAside:
        joblog.qa_session_released(session.id, owner)
        log.info("QA session %d: given back for clinical images", session.id)
        return 0
    except _LeaseLost:
        log.warning("QA session %d: lease lost while evaluating; another evaluator may have it", session.id)
        return 0
    except NodeError as exc:
        log.error("QA session %d: failed: %s", session.id, exc)
        joblog.qa_session_failed(session.id, owner, str(exc))
        return 1
    except Exception as exc:  # an internal error: retried up to the cap, with its traceback in the log
        error = f"internal error: {type(exc).__name__}: {exc}"
        retry = session.attempts < config.worker.max_attempts
        if not retry:
            error += f" (gave up after {session.attempts} attempts)"
        log.error("QA session %d: %s", session.id, error, exc_info=True)
        joblog.qa_session_failed(session.id, owner, error, retry=retry)
        return 1
    joblog.qa_session_evaluated(session.id, owner, json.loads(strict_json(result)))  # stored as strict JSON
    log.info("QA session %d: evaluated (%d images)", session.id, len(images))
    return 1


def trend(
    joblog: JobLog, detector: str | None = None, rule: str | None = None, limit: int | None = 100
) -> list[dict[str, Any]]:
    """The newest `limit` sessions (`session_row`), oldest first: a detector's figures over time, as
    `qa-sessions` lists them and the dashboard plots them."""
    return [session_row(s) for s in reversed(joblog.qa_sessions(detector=detector, rule=rule, limit=limit))]


def session_row(session: QaSessionSnapshot) -> dict[str, Any]:
    """A stored session as one flat record: its state, and its figures when it was evaluated."""
    result = session.result or {}
    return {
        "id": session.id,
        "rule": session.rule,
        "detector": session.detector_serial,
        "station": session.station_name,
        "first_image_at": session.first_image_at,
        "last_image_at": session.last_image_at,
        "status": str(session.status),
        "evaluated_at": session.evaluated_at,
        "error": session.error,
        "full_dose": result.get("full_dose"),
        "doses": result.get("doses", []),
    }


class _StepAside(Exception):
    """Stops an evaluation between two images: clinical images wait."""


class _LeaseLost(Exception):
    """Stops an evaluation between two images: another evaluator has the session now."""


def _session_images(joblog: JobLog, session: QaSessionSnapshot) -> tuple[list[MammoImage], str]:
    jobs = joblog.qa_session_jobs(session.id)
    if not jobs:
        raise InputRefused(f"QA session {session.id} has no images")
    profiles = sorted({job.profile for job in jobs})
    if len(profiles) > 1:
        raise InputRefused(f"the session's images came through several profiles ({', '.join(profiles)})")
    images = []
    for job in jobs:
        path = Path(job.input_path)
        if not path.exists():
            raise InputRefused(f"the input file of job {job.id} is gone ({path}); was [node] retention_days too short?")
        images.append(read_mammogram(path, label=f"job {job.id}"))
    return images, profiles[0]


def _check_images(images: Sequence[MammoImage]) -> None:
    if not images:
        raise InputRefused("no images to evaluate")
    shapes = sorted({image.pixels.shape for image in images})
    if len(shapes) > 1:
        sizes = ", ".join(f"{rows}×{cols}" for rows, cols in shapes)
        raise InputRefused(f"the images have different sizes ({sizes}): a session needs one phantom in one position")
    detectors = sorted({str(image.params.detector_serial) for image in images})
    if len(detectors) > 1:
        raise InputRefused(f"the images come from several detectors ({', '.join(detectors)}): evaluate each alone")
    kvps = sorted({image.params.kvp for image in images if image.params.kvp is not None})
    if len(kvps) > 1:
        raise InputRefused(
            f"the images were taken at several tube voltages ({', '.join(f'{k:g}' for k in kvps)} kV): "
            "the dose fraction is the mAs ratio only at one kV"
        )
    for image in images:
        if not image.params.for_processing:
            raise InputRefused(f"{_name(image)} is For Presentation: phantom QA needs the raw For Processing images")


def _exposure(image: MammoImage) -> float:
    mas = image.params.exposure_mas
    if mas is None or not mas > 0:
        raise InputRefused(
            f"{_name(image)} records no exposure (Exposure (0018,1152) or Exposure in µAs (0018,1153)): "
            "the dose of each image must be known"
        )
    return mas


def _name(image: MammoImage) -> str:
    return f"image {image.dataset.get('SOPInstanceUID', '?')}"


def _figures(stack: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> dict[str, float | None]:
    figures = mnse(stack, reference, mask)
    return {
        "rn": _finite(figures.rn),
        "b2": _finite(figures.b2),
        "mnse": _finite(figures.mnse),
        "snr": _finite(mean_snr(stack, mask)),
    }


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return value / reference
