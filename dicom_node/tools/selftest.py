"""`dicom-node selftest`: push a synthetic phantom through the running node and time each stage.

The selftest acts as a modality (calling AE [selftest].calling_ae, from loopback) and as the
destination: the node restores the image with its built-in "selftest" profile and sends the result
to a receiver this command runs on loopback, so a clinical PACS never sees a phantom.
"""

from __future__ import annotations

import queue
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # generated at import; mypy can't see it

from dicom_node.checks import existing_joblog_url
from dicom_node.config import SELFTEST_PROFILE, Config, Destination, Profile
from dicom_node.detectors import detector_noise
from dicom_node.errors import Unavailable
from dicom_node.forward.scu import send_file
from dicom_node.imaging import LOSSLESS_TRANSFER_SYNTAXES, MG_FOR_PROCESSING, raw_mammogram_dataset, save_dataset
from dicom_node.joblog import JobLog
from dicom_node.sim.acquisition import acquire
from dicom_node.sim.phantom import make_phantom

SELFTEST_DESTINATION = "selftest-receiver"
SIMULATED_DETECTOR = "SIM-0001"


def with_selftest(config: Config) -> Config:
    """`config` plus the selftest's profile and loopback destination (what `serve` runs with)."""
    if SELFTEST_PROFILE in config.profiles:
        return config
    receiver = Destination(
        name=SELFTEST_DESTINATION,
        ae_title=config.selftest.receiver_ae,
        host="127.0.0.1",
        port=config.selftest.receiver_port,
        timeout_s=30,
    )
    profile = Profile(pipeline="gat-bm3d", dose_fraction=config.selftest.dose_fraction, destinations=[receiver.name])
    return config.model_copy(
        update={
            "destinations": [*config.destinations, receiver],
            "profiles": {**config.profiles, SELFTEST_PROFILE: profile},
        }
    )


class SelftestError(Unavailable):
    """The chain did not carry the image through; the text says where it stopped."""

    def __init__(self, message: str) -> None:
        super().__init__(f"selftest failed: {message}")


@dataclass
class SelftestReport:
    sop_instance_uid: str
    derived_sop_instance_uid: str
    job_id: int
    stages_s: dict[str, float | None] = field(default_factory=dict)  # None: the job log has no time for it
    qc: dict[str, float] = field(default_factory=dict)


def _loopback_receiver(config: Config, received: queue.Queue):
    ae = AE(ae_title=config.selftest.receiver_ae)
    ae.maximum_pdu_size = 0
    ae.add_supported_context(MG_FOR_PROCESSING, list(LOSSLESS_TRANSFER_SYNTAXES))
    ae.add_supported_context(Verification)

    def on_store(event):
        received.put(event.dataset)
        return 0x0000

    try:
        return ae.start_server(
            ("127.0.0.1", config.selftest.receiver_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
        )
    except OSError as exc:
        raise SelftestError(
            f"cannot listen on 127.0.0.1:{config.selftest.receiver_port} for the node's answer: {exc.strerror or exc}"
        ) from None


def run_selftest(config: Config, *, size: tuple[int, int] = (512, 416), timeout_s: float = 600) -> SelftestReport:
    joblog_url = existing_joblog_url(config)  # the running node's job log, before anything is sent
    noise = detector_noise(config, SIMULATED_DETECTOR)  # the selftest simulates this detector
    seed = time.time_ns() % 2**31  # a new instance each run: an identical resend would be ignored as a duplicate
    phantom = make_phantom(size, seed=seed)
    dose = config.selftest.dose_fraction
    pixels = acquire(phantom.signal, noise, dose, rng_or_seed=seed)
    dataset = raw_mammogram_dataset(
        pixels,
        seed=seed,
        patient_id="SELFTEST",
        patient_name="SELFTEST^DICOMNODE",
        dose_label=f"selftest {dose * 100:g}% dose",
    )
    uid = str(dataset.SOPInstanceUID)

    received: queue.Queue = queue.Queue()
    server = _loopback_receiver(config, received)
    try:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "selftest.dcm"
            save_dataset(dataset, path)
            started = time.monotonic()
            result = send_file(
                path,
                ae_title=config.node.ae_title,
                host="127.0.0.1",
                port=config.node.port,
                calling_ae=config.selftest.calling_ae,
                timeout_s=60,
            )
        if not result.ok:
            raise SelftestError(f"the node did not accept the phantom: {result.message}")
        derived = _wait_for_derived(received, uid, started + timeout_s)
    finally:
        server.shutdown()
    return _report(JobLog(joblog_url), uid, str(derived.SOPInstanceUID))


def _wait_for_derived(received: queue.Queue, source_uid: str, deadline: float):
    while True:
        try:
            dataset = received.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise SelftestError(
                "the restored image did not arrive in time; see `dicom-node jobs` for the job"
            ) from None
        sources = [item.ReferencedSOPInstanceUID for item in dataset.get("SourceImageSequence", [])]
        if source_uid in sources:
            return dataset


def _report(joblog: JobLog, uid: str, derived_uid: str) -> SelftestReport:
    deadline = time.monotonic() + 10  # the delivery is recorded just after the receiver answered
    while True:
        job = joblog.find_by_sop_instance(uid)[-1]
        if job.status == "done" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    sends = [d.send_s for d in joblog.deliveries(job.id) if d.send_s is not None]
    stages = {
        "queued": (job.claimed_at - job.received_at).total_seconds() if job.claimed_at else float("nan"),
        "decode": job.decode_s,
        "restore": job.restore_s,
        "derive": job.derive_s,
        "forward": sum(sends) if sends else float("nan"),
    }
    if job.completed_at:
        stages["total"] = (job.completed_at - job.received_at).total_seconds()
    return SelftestReport(uid, derived_uid, job.id, stages, dict(job.qc or {}))
