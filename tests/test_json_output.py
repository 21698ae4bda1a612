"""Every `--json` output of the CLI is strict JSON: a figure that is not a number is null, never NaN."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import typer.main

from dicom_node.cli import app, main
from dicom_node.imaging import raw_mammogram_dataset, save_dataset
from dicom_node.joblog import JobLog

# The commands with --json, as the CLI spells them, and the test below that parses each one's output.
# qa-phantom and qa-sessions are parsed as strictly in tests/test_phantom_qa.py
COVERED = {("process",), ("jobs",), ("jobs", "show"), ("qa-phantom",), ("qa-sessions",), ("audit",)}


def strict_loads(text: str):
    """json.loads that refuses NaN and ±Infinity, which Python writes and no other JSON reader takes."""

    def refuse(constant: str):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def run(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out, err = capsys.readouterr()
    return info.value.code, out, err


def json_commands(command, path: tuple[str, ...] = ()):
    for name, sub in getattr(command, "commands", {}).items():
        yield from json_commands(sub, (*path, name))
    if any("--json" in getattr(param, "opts", []) for param in command.params):
        yield path


def test_every_json_output_is_covered_here():
    assert set(json_commands(typer.main.get_command(app))) == COVERED


def test_the_parser_here_refuses_nan():
    with pytest.raises(ValueError, match="NaN"):
        strict_loads(json.dumps({"qc": float("nan")}))


def test_process_json_with_nan_qc_figures(capsys, tmp_path):
    """A flat image has no breast: its QC figures are undefined (NaN inside), null in the JSON."""
    source = tmp_path / "flat.dcm"
    save_dataset(raw_mammogram_dataset(np.full((96, 80), 500, np.uint16), seed=1, detector_serial="SIM-0001"), source)
    code, out, err = run(capsys, "process", str(source), str(tmp_path / "out.dcm"), "--dose-fraction", "0.5", "--json")
    assert code == 0, err
    report = strict_loads(out)
    assert report["qc"]["breast_fraction"] == 0
    assert report["qc"]["mean_ratio"] is None


@pytest.fixture
def job_with_nan_qc(tmp_path) -> tuple[Path, int]:
    """A configuration whose job log holds one restored job with a NaN QC figure and an infinite timing."""
    config = tmp_path / "node.toml"
    config.write_text('[node]\ndata_dir = "data"\n')
    joblog = JobLog(f"sqlite:///{tmp_path / 'data' / 'joblog.sqlite'}")
    job_id = joblog.record_received(
        sop_instance_uid="1.2.826.0.1.3680043.8.498.7",
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
        input_path="/spool/7.dcm",
        input_sha256="7" * 64,
        input_bytes=1000,
    )
    claimed = joblog.claim_job("worker-1", lease_s=60)
    assert claimed is not None and claimed.id == job_id
    assert joblog.job_processed(
        job_id,
        "worker-1",
        derived_path="/data/derived/7.dcm",
        derived_sop_instance_uid="2.25.7",
        qc={"mean_ratio": math.nan, "breast_fraction": 0.0},
        timings={"restore": math.inf},
        device="cpu",
        model_digest=None,
        deliveries=[("outbox", "derived")],
    )
    joblog.close()
    return config, job_id


def test_jobs_json_with_nan_qc_figures(capsys, job_with_nan_qc):
    config, job_id = job_with_nan_qc
    code, out, err = run(capsys, "jobs", "--json", "--config", str(config))
    assert code == 0, err
    [job] = strict_loads(out)
    assert job["id"] == job_id and job["qc"]["mean_ratio"] is None and job["timings"]["restore"] is None
    assert [d["destination"] for d in job["deliveries"]] == ["outbox"]


def test_jobs_show_json_with_nan_qc_figures(capsys, job_with_nan_qc):
    config, job_id = job_with_nan_qc
    code, out, err = run(capsys, "jobs", "show", str(job_id), "--json", "--config", str(config))
    assert code == 0, err
    job = strict_loads(out)
    assert job["id"] == job_id and job["qc"]["mean_ratio"] is None and job["events"]
