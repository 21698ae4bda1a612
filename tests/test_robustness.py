"""bench/robustness.py's --quick grid: the files, the table's shape, and sane figures.

One 192×160 phantom at 70 µm, one detector, no and strong crosstalk, half dose, no λ error, the default
(spectral) and the plain blend, the deep restorer's default model, P = 2, N = 3: under a minute.
A second run with --jobs 2 must give the same figures (each unit of the grid is seeded by its own
key, whatever process runs it). The defaults are held to the issue's goals where this small grid
supports them; the rest is printed (docs/robustness.md has the full grid).
"""

import csv
import importlib
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
robustness = importlib.import_module("robustness")

DEEP = "DL " + Path(robustness.default_deep_model(0.5)).name
EXPECTED_METHODS = [  # (crosstalk, method) in grid order
    ("0", "LD"),
    ("0", "FD"),
    ("0", "MB spectral"),
    ("0", "MB plain"),
    ("0", DEEP),
    ("0.5", "LD"),
    ("0.5", "FD"),
    ("0.5", "MB spectral"),
    ("0.5", "MB spectral, white"),
    ("0.5", "MB plain"),
    ("0.5", "MB plain, white"),
    ("0.5", DEEP),
]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("robustness")
    records = robustness.main(["--quick", "--out", str(out)])
    return out, records


def test_quick_grid_writes_the_table_and_csv(quick_run):
    out, records = quick_run
    md, table_csv = out / robustness.TABLE_MD, out / robustness.TABLE_CSV
    assert md.is_file() and table_csv.is_file()

    text = md.read_text(encoding="utf-8")
    assert "machine:" in text and "wall time:" in text and "CPUs" in text
    table = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    for column in ("method", "RN/FD", "B² (%)", "exact B² (%)", "MNSE/FD", "calc. kept", "goal"):
        assert column in header
    body = [[cell.strip() for cell in line.strip("|").split("|")] for line in table[2:]]
    assert all(len(row) == len(header) for row in body)
    method, crosstalk = header.index("method"), header.index("crosstalk")
    assert [(row[crosstalk], row[method]) for row in body] == EXPECTED_METHODS

    with table_csv.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(r["crosstalk"], r["method"]) for r in rows] == [(str(float(c)), m) for c, m in EXPECTED_METHODS]
    assert [r["method"] for r in rows] == [r["method"] for r in records]

    for r in records:
        for key in robustness.FIGURES:
            assert math.isfinite(float(r[key])), (r["method"], key, r[key])
        assert r["goal"] == "—" if r["method"] in ("LD", "FD") else r["goal"].startswith(("ok", "miss"))
        if r["method"] == "LD":
            assert float(r["rn_over_fd"]) > 1.5 and float(r["exact_rn_over_fd"]) > 1.5  # half dose: ≈ 2
        if r["method"] == "FD":
            assert float(r["rn_over_fd"]) == pytest.approx(1.0) and float(r["mnse_over_fd"]) == pytest.approx(1.0)
            assert 5 < float(r["rn_pct"]) < 20  # λ = 0.1 at ~1000 ADU of tissue: about 10 %
        if r["method"].startswith(("MB", "DL")):
            assert float(r["rn_over_fd"]) < 2.5 and float(r["calcification_retention"]) > 0.8


def test_defaults_against_the_goals(quick_run):
    """Half dose, white noise: the MB default (BM3D, spectral blend) and the deep default (the shipped
    conditioned denoiser, GAT → network → inverse → spectral blend) reach full-dose noise and keep
    the calcifications.
    Printed, not asserted, because not reached on every row (docs/robustness.md says by how much):
    the defaults' B² at most the plain blend's; full-dose noise and calcification contrast with
    strong crosstalk."""
    _, records = quick_run
    by = {(r["crosstalk"], r["method"]): r for r in records}
    for (crosstalk, method), r in by.items():
        if method in ("MB spectral", "MB plain", DEEP):
            print(
                f"crosstalk {crosstalk} {method}: RN/FD {float(r['rn_over_fd']):.3f}, B² {float(r['b2_pct']):.3f} % "
                f"(exact {float(r['exact_b2_pct']):.3f} %), calcification contrast kept "
                f"{float(r['calcification_retention']):.3f}, goal: {r['goal']}"
            )
    low, high = robustness.GOAL_HALF_DOSE
    for white in (by[(0.0, "MB spectral")], by[(0.0, DEEP)]):  # the MB and the deep default
        assert low <= float(white["rn_over_fd"]) <= high and low <= float(white["exact_rn_over_fd"]) <= high
        assert float(white["calcification_retention"]) >= robustness.GOAL_CALCIFICATION
        assert white["goal"] == "ok"
    assert float(by[(0.0, "MB plain")]["rn_over_fd"]) > high  # the plain blend, kept to compare, does not


def test_parallel_run_gives_the_same_figures(quick_run, tmp_path):
    _, records = quick_run
    parallel = robustness.main(["--quick", "--jobs", "2", "--out", str(tmp_path)])
    keys = ["method", "crosstalk", "rn_over_fd", "exact_rn_over_fd", "b2_pct", "exact_b2_pct"]
    assert [[r[k] for k in keys] for r in parallel] == [[r[k] for k in keys] for r in records]


def test_detectors_are_presets_or_custom():
    parse = robustness.parse_detectors
    assert parse("hologic,0.2:5:100")[1].gain == 0.2
    with pytest.raises(Exception, match="unknown detector"):
        parse("nonsense")


def test_blends_are_named_or_none():
    assert robustness.parse_blends("spectral, plain") == ("spectral", "plain")
    assert robustness.parse_blends("none") == ()
    with pytest.raises(Exception, match="blends must be among"):
        robustness.parse_blends("sharp")
