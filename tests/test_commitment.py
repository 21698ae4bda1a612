"""Delivery that PACS confirms: Storage Commitment (push model) after each send to a destination
that asks for it. Orthanc is a real Storage Commitment SCP (it reports on an association of its
own); a scripted pynetdicom PACS plays the ones that refuse, or never answer."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification

from dicom_node.config import Config, ConfigurationError, parse_config
from dicom_node.imaging import raw_mammogram_dataset, save_dataset
from dicom_node.imaging.read import MG_FOR_PRESENTATION
from dicom_node.joblog import JobLog
from dicom_node.node.service import Node

from peers import Orthanc, free_port, storescu, wait_until


def node_config(tmp_path: Path, node_port: int, pacs_ae: str, pacs_port: int, **destination: object) -> Config:
    """Images of MG For Presentation pass through to PACS unchanged (no restoration: this is about delivery)."""
    return parse_config(
        {
            "node": {
                "ae_title": "DOSENODE",
                "bind": "127.0.0.1",
                "port": node_port,
                "data_dir": str(tmp_path / "data"),
            },
            "sources": [{"ae_title": "MAMMO1", "profile": "pass"}],
            "destinations": [
                {
                    "name": "pacs",
                    "ae_title": pacs_ae,
                    "host": "127.0.0.1",
                    "port": pacs_port,
                    "storage_commitment": True,
                }
                | destination
            ],
            "profiles": {
                "pass": {"dose_fraction": 0.5, "destinations": ["pacs"], "pass_through": [MG_FOR_PRESENTATION]}
            },
            "worker": {"count": 0},
            "retry": {"initial_s": 0.2, "multiplier": 1, "jitter": 0, "max_delay_s": 0.2, "max_age_h": 1},
            "selftest": {"receiver_port": free_port()},
        }
    )


def presentation_image(folder: Path, seed: int = 1) -> tuple[Path, Dataset]:
    ds = raw_mammogram_dataset(np.full((96, 80), 700, dtype=np.uint16), seed=seed)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MG_FOR_PRESENTATION
    path = folder / f"presentation-{seed}.dcm"
    save_dataset(ds, path)
    return path, ds


@pytest.fixture
def running(tmp_path: Path) -> Iterator[list[Node]]:
    nodes: list[Node] = []
    yield nodes
    for node in nodes:
        node.stop()


def start(nodes: list[Node], config: Config) -> Node:
    node = Node(config)
    node.start()
    nodes.append(node)
    return node


def history(joblog: JobLog, job_id: int) -> list[str]:
    return [event.kind for event in joblog.events(job_id)]


def settled(joblog: JobLog, status: str = "done") -> list:
    jobs = joblog.list_jobs()
    return jobs if jobs and all(str(job.status) == status for job in jobs) else []


def test_orthanc_commits_and_only_then_the_send_counts(tmp_path: Path, running: list[Node]) -> None:
    node_port = free_port()
    pacs = Orthanc(
        tmp_path / "orthanc", modalities={"node": {"AET": "DOSENODE", "Host": "127.0.0.1", "Port": node_port}}
    ).start()
    try:
        node = start(running, node_config(tmp_path, node_port, "ORTHANC", pacs.dicom_port))
        path, ds = presentation_image(tmp_path)
        assert storescu(node_port, path).returncode == 0
        [job] = wait_until(lambda: settled(node.joblog), 60, message=lambda: f"jobs: {node.joblog.list_jobs()}")
        kinds = history(node.joblog, job.id)
        assert kinds.index("stored") < kinds.index("committed"), kinds
        [delivery] = node.joblog.deliveries(job.id)
        assert str(delivery.status) == "sent" and delivery.commitment_uid
        assert pacs.find(str(ds.SOPInstanceUID))
        accepted = [line.actor for line in node.joblog.audit_events(event="association-accepted")]
        assert "ORTHANC" in accepted  # Orthanc called back with its report
    finally:
        pacs.stop()


class CommittingPacs:
    """A Storage SCP that also takes commitment requests and reports on them later, on its own
    association, as each of `answers` says: "commit", "fail" (reason 0x0110) or "silent"."""

    def __init__(self, node_port: int, answers: list[str], ae_title: str = "PACS"):
        self.node_port, self.answers, self.ae_title = node_port, list(answers), ae_title
        self.requests: list[str] = []
        ae = AE(ae_title=ae_title)
        ae.add_supported_context(MG_FOR_PRESENTATION, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(StorageCommitmentPushModel)
        ae.add_supported_context(Verification)
        self.port = free_port()
        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, lambda _: 0x0000), (evt.EVT_N_ACTION, self._on_action)],
        )

    def _on_action(self, event: evt.Event) -> tuple[int, None]:
        request = event.action_information
        self.requests.append(str(request.TransactionUID))
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if answer != "silent":
            threading.Timer(0.2, self._report, args=(request, answer)).start()
        return 0x0000, None

    def _report(self, request: Dataset, answer: str) -> None:
        report = Dataset()
        report.TransactionUID = request.TransactionUID
        items = list(request.ReferencedSOPSequence)
        if answer == "commit":
            report.ReferencedSOPSequence = items
        else:
            for item in items:
                item.FailureReason = 0x0110
            report.FailedSOPSequence = items
        ae = AE(ae_title=self.ae_title)
        ae.add_requested_context(StorageCommitmentPushModel)
        assoc = ae.associate("127.0.0.1", self.node_port, ae_title="DOSENODE")
        if assoc.is_established:
            self.reported = assoc.send_n_event_report(
                report, 1 if answer == "commit" else 2, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1"
            )
            assoc.release()

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def committing_pacs() -> Iterator[list[CommittingPacs]]:
    started: list[CommittingPacs] = []
    yield started
    for pacs in started:
        pacs.stop()


@pytest.mark.parametrize(
    ("answers", "options", "attempts"),
    [
        (["fail", "commit"], {}, 2),  # PACS did not commit: sent again, then committed
        (["silent", "commit"], {"commitment_timeout_s": 1}, 2),  # no report in time: sent again
    ],
    ids=["failure-then-commit", "silence-then-commit"],
)
def test_a_commitment_refused_or_never_reported_is_sent_again(
    tmp_path: Path, running: list[Node], committing_pacs: list[CommittingPacs], answers, options, attempts
) -> None:
    node_port = free_port()
    pacs = CommittingPacs(node_port, answers)
    committing_pacs.append(pacs)
    node = start(running, node_config(tmp_path, node_port, "PACS", pacs.port, **options))
    path, _ = presentation_image(tmp_path)
    assert storescu(node_port, path).returncode == 0
    [job] = wait_until(lambda: settled(node.joblog), 60, message=lambda: f"events: {node.joblog.events(1)}")
    [delivery] = node.joblog.deliveries(job.id)
    assert delivery.attempts == attempts == len(pacs.requests)
    assert len(set(pacs.requests)) == attempts  # a new transaction for each attempt
    failures = [e.detail or "" for e in node.joblog.events(job.id) if e.kind == "send-failed"]
    expected = "failure reason 0x0110" if answers[0] == "fail" else "no storage commitment report in time"
    assert len(failures) == 1 and expected in failures[0], failures


def test_a_report_from_another_ae_settles_nothing(
    tmp_path: Path, running: list[Node], committing_pacs: list[CommittingPacs]
) -> None:
    """Only the destination asked may answer for it; the node admits its AE title from its host only."""
    node_port = free_port()
    pacs = CommittingPacs(node_port, ["silent"])
    committing_pacs.append(pacs)
    node = start(running, node_config(tmp_path, node_port, "PACS", pacs.port, commitment_timeout_s=60))
    path, _ = presentation_image(tmp_path)
    assert storescu(node_port, path).returncode == 0
    [delivery] = wait_until(
        lambda: [
            d for j in node.joblog.list_jobs() for d in node.joblog.deliveries(j.id) if str(d.status) == "committing"
        ],
        30,
    )
    impostor = CommittingPacs(node_port, ["commit"], ae_title="IMPOSTOR")
    committing_pacs.append(impostor)
    request = Dataset()
    request.TransactionUID = delivery.commitment_uid
    request.ReferencedSOPSequence = []
    impostor._report(request, "commit")  # an AE that is no commitment destination: rejected
    rejected = wait_until(lambda: node.joblog.audit_events(event="association-rejected"), 10)
    assert rejected[0].actor == "IMPOSTOR"
    assert str(node.joblog.deliveries(delivery.job_id)[0].status) == "committing"


def test_storage_commitment_needs_a_network_destination() -> None:
    with pytest.raises(ConfigurationError, match="storage_commitment needs a network destination"):
        parse_config({"destinations": [{"name": "box", "folder": "out", "storage_commitment": True}]})
