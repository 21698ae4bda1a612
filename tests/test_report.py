"""`dicom-node report`: the job list and per-station summary of a period, as Markdown, CSV and HTML.

Jobs with known stage times, stations, flags and receive dates are written to a real job log;
the summary's figures are checked against values worked out by hand.
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import pytest
from sqlalchemy import update

from dicom_node.cli import main
from dicom_node.joblog import JobLog
from dicom_node.joblog.tables import Job
from dicom_node.qa.report import (
    ALL_STATIONS,
    CSV_COLUMNS,
    build_report,
    percentile,
    render_csv,
    render_html,
    render_markdown,
)

IN_PERIOD = datetime(2026, 11, 10, 9, 0, tzinfo=UTC)
BEFORE = datetime(2026, 10, 1, 9, 0, tzinfo=UTC)
MG1_RESTORE_S = [1.0, 2.0, 3.0, 4.0, 10.0]  # median 3, p95 4 + 0.8 × 6 = 8.8
SCRIPT_ERROR = "<script>alert(1)</script> | peer refused"


def run(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out, err = capsys.readouterr()
    return info.value.code, out, err


def receive(joblog: JobLog, n: int, *, station: str | None, calling_ae: str, at: datetime) -> int:
    job_id = joblog.record_received(
        sop_instance_uid=f"1.2.826.0.1.3680043.8.498.{n}",
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2.1",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        calling_ae=calling_ae,
        called_ae="DOSENODE",
        peer_host="127.0.0.1",
        station_name=station,
        detector_serial="SIM-0001",
        profile="half",
        input_path=f"/spool/{n}.dcm",
        input_sha256=f"{n:064x}",
        input_bytes=1000,
    )
    with joblog.engine.begin() as connection:
        connection.execute(update(Job).where(Job.id == job_id).values(received_at=at))
    return job_id


def restore_and_send(joblog: JobLog, job_id: int, restore_s: float, send_s: float, flags: list[str] = ()) -> None:
    assert joblog.claim_job("w1", 60).id == job_id
    joblog.record_stage(job_id, "decoded", 0.1)
    joblog.record_stage(job_id, "restored", restore_s)
    joblog.record_stage(job_id, "derived", 0.3)
    assert joblog.job_processed(
        job_id,
        "w1",
        derived_path=f"/derived/{job_id}.dcm",
        derived_sop_instance_uid=f"2.25.{job_id}",
        qc={},
        timings={"total": restore_s},
        device="cpu",
        model_digest=None,
        deliveries=[("pacs", "derived")],
        qc_flags=[{"figure": f, "value": 2.0, "min": 0.0, "max": 1.0, "message": f"{f} high"} for f in flags],
    )
    delivery = joblog.claim_delivery("fw", 60)
    assert delivery.job_id == job_id
    joblog.delivery_sent(delivery.id, status=0, send_s=send_s)


@pytest.fixture
def node(tmp_path: Path) -> Path:
    """A configuration whose job log holds, on 2026-11-10: five MG1 jobs sent to PACS (two flagged),
    and for the station known only by its calling AE MAMMO2 one job sent and one failed; one more
    MG1 job on 2026-10-01, before the period."""
    config = tmp_path / "node.toml"
    config.write_text('[node]\ndata_dir = "data"\n')
    joblog = JobLog(f"sqlite:///{tmp_path / 'data' / 'joblog.sqlite'}")
    flags = [["snr_gain"], [], ["snr_gain", "mean_ratio"], [], []]
    for n, (restore_s, flagged) in enumerate(zip(MG1_RESTORE_S, flags, strict=True), start=1):
        job_id = receive(joblog, n, station="MG1", calling_ae="MAMMO1", at=IN_PERIOD + timedelta(minutes=n))
        restore_and_send(joblog, job_id, restore_s, send_s=0.5 * n, flags=flagged)
    job_id = receive(joblog, 6, station=None, calling_ae="MAMMO2", at=IN_PERIOD)
    restore_and_send(joblog, job_id, 5.0, send_s=0.25)
    job_id = receive(joblog, 7, station=None, calling_ae="MAMMO2", at=IN_PERIOD + timedelta(hours=1))
    assert joblog.claim_job("w1", 60).id == job_id
    assert joblog.job_failed(job_id, "w1", SCRIPT_ERROR, retry_at=None)
    job_id = receive(joblog, 8, station="MG1", calling_ae="MAMMO1", at=BEFORE)
    restore_and_send(joblog, job_id, 99.0, send_s=9.0)
    joblog.close()
    return config


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([float(v) for v in range(1, 21)], 0.5, 10.5),
        ([float(v) for v in range(1, 21)], 0.95, 19.05),
        ([4.0, 1.0, 3.0, 2.0], 0.95, 3.85),  # unsorted input
        ([7.0], 0.95, 7.0),
        ([], 0.5, None),
    ],
)
def test_percentile_interpolates_between_ranks(values: list[float], q: float, expected: float | None) -> None:
    assert percentile(values, q) == pytest.approx(expected)


def test_summary_per_station_from_the_job_log(node: Path) -> None:
    joblog = JobLog(f"sqlite:///{node.parent / 'data' / 'joblog.sqlite'}")
    jobs = joblog.list_jobs(since=datetime(2026, 11, 1, tzinfo=UTC), limit=None)
    deliveries = {job.id: joblog.deliveries(job.id) for job in jobs}
    joblog.close()
    report = build_report(jobs, deliveries, generated_at=datetime(2026, 12, 1, tzinfo=UTC))

    assert [row.id for row in report.jobs] == [1, 2, 3, 4, 5, 6, 7]  # oldest first, job 8 is before the period
    mammo2, mg1 = report.stations  # by name
    assert (mammo2.station, mg1.station, report.total.station) == ("MAMMO2", "MG1", ALL_STATIONS)
    assert (mg1.jobs, mg1.statuses["done"], mg1.qc_flagged, mg1.flag_figures) == (
        5,
        5,
        2,
        {"mean_ratio": 1, "snr_gain": 2},
    )
    restore = mg1.stages["restore"]
    assert (restore.count, restore.median, restore.p95) == (5, 3.0, pytest.approx(8.8))
    send = mg1.stages["send"]  # 0.5, 1.0, 1.5, 2.0, 2.5
    assert (send.count, send.median, send.p95) == (5, 1.5, pytest.approx(2.4))
    assert (mammo2.jobs, mammo2.statuses["done"], mammo2.statuses["failed"], mammo2.qc_flagged) == (2, 1, 1, 0)
    assert (mammo2.stages["restore"].count, mammo2.stages["restore"].median) == (1, 5.0)
    assert report.total.jobs == 7 and report.total.stages["restore"].median == 3.5  # 1 2 3 4 5 10
    assert report.jobs[2].qc_flags == ("snr_gain", "mean_ratio") and report.jobs[2].sent_to == ("pacs",)
    assert report.jobs[6].send_s is None and report.jobs[6].last_error == SCRIPT_ERROR

    markdown = render_markdown(report)
    assert "| MG1 | restore | 5 | 3.00 | 8.80 |" in markdown
    assert "| MG1 | 5 | 0 | 0 | 0 | 0 | 5 | 0 | 0 | 0 | 2 (mean_ratio 1, snr_gain 2) |" in markdown
    assert "\\<script>alert(1)\\</script> \\| peer refused" in markdown  # no HTML, no split cell
    assert "Retried" in markdown and render_csv(report).count("\n") == 8 and ALL_STATIONS in render_html(report)


def test_csv_for_a_period_and_a_station(capsys, node: Path) -> None:
    args = ("report", "--config", str(node), "--since", "2026-11-01", "--until", "2026-11-11", "--format", "csv")
    code, out, err = run(capsys, *args)
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert [row["job"] for row in rows] == ["1", "2", "3", "4", "5", "6", "7"]
    first, failed = rows[0], rows[6]
    assert (first["station"], first["status"], first["restore_s"], first["send_s"]) == ("MG1", "done", "1.000", "0.500")
    assert first["received_at"] == "2026-11-10T09:01:00+00:00" and first["qc_flags"] == "snr_gain"
    assert (failed["station"], failed["status"], failed["restore_s"], failed["last_error"]) == (
        "MAMMO2",
        "failed",
        "",
        SCRIPT_ERROR,
    )

    code, out, err = run(capsys, *args, "--station", "MAMMO2")
    assert code == 0, err
    assert [row["job"] for row in csv.DictReader(io.StringIO(out))] == ["6", "7"]

    code, out, _ = run(capsys, "report", "--config", str(node), "--until", "2026-11-01", "--format", "csv")
    assert code == 0 and [row["job"] for row in csv.DictReader(io.StringIO(out))] == ["8"]


def test_markdown_is_the_default(capsys, node: Path) -> None:
    code, out, err = run(capsys, "report", "--config", str(node), "--since", "2026-11-01", "--station", "MG1")
    assert code == 0, err
    assert out.startswith("# dicom-node report\n")
    assert "5 jobs received from 2026-11-01 00:00 to " in out and "UTC, at station MG1." in out
    assert "| MG1 | restore | 5 | 3.00 | 8.80 |" in out
    assert "MAMMO2" not in out


class Page(HTMLParser):
    """What a browser would load or run from the page, and its text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.links: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.links += [value or "" for name, value in attrs if name in ("src", "href")]

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_html_is_one_escaped_self_contained_page(capsys, node: Path, tmp_path: Path) -> None:
    target = tmp_path / "out" / "report.html"
    target.parent.mkdir()
    code, out, err = run(
        capsys, "report", "--config", str(node), "--since", "2026-11-01", "--format", "html", "--output", str(target)
    )
    assert code == 0, err
    assert out == "" and f"report written to {target}" in err
    page = Page()
    page.feed(target.read_text())
    assert "table" in page.tags and "script" not in page.tags and page.links == []
    text = "".join(page.text)
    assert SCRIPT_ERROR in text  # shown as text, escaped in the markup
    assert "8.80" in text and "2 (mean_ratio 1, snr_gain 2)" in text


def test_an_empty_period_is_an_empty_report(capsys, node: Path) -> None:
    code, out, err = run(capsys, "report", "--config", str(node), "--since", "2027-01-01", "--format", "csv")
    assert code == 0
    assert out == ",".join(CSV_COLUMNS) + "\n"
    assert "no jobs received from 2027-01-01 00:00 to" in err

    code, out, err = run(capsys, "report", "--config", str(node), "--station", "NOWHERE")
    assert code == 0 and "0 jobs" in out and "at station NOWHERE" in err


@pytest.mark.parametrize(
    ("args", "fragment"),
    [(("--format", "pdf"), "--format"), (("--until", "next week"), "--until"), (("--since", "soon"), "--since")],
)
def test_bad_options_are_one_line(capsys, node: Path, args: tuple[str, ...], fragment: str) -> None:
    code, out, err = run(capsys, "report", "--config", str(node), *args)
    assert code != 0 and out == ""
    assert len(err.strip().splitlines()) == 1 and fragment in err and "Traceback" not in err


def test_an_output_that_cannot_be_written_is_one_line(capsys, node: Path, tmp_path: Path) -> None:
    target = tmp_path / "no-such-folder" / "report.md"
    code, out, err = run(capsys, "report", "--config", str(node), "--output", str(target))
    assert code == 2 and out == "" and not target.parent.exists()
    assert (
        err.strip().splitlines()[-1]
        == f"dicom-node: error: cannot write the report to {target}: No such file or directory"
    )
