"""The evaluation protocol on stacks whose answer is known analytically."""

import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from dicom_node.sim.evaluation import (
    RECORD_FIELDS,
    calcification_retention,
    evaluate_group,
    exact_noise_bias,
    figures_record,
    markdown_table,
    mean_snr,
    mnse,
    snr_map,
)
from dicom_node.sim.phantom import make_phantom

SHAPE = (120, 100)


def truth_and_mask():
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    # Large-scale structure (most of the contrast, as in a breast) plus fine detail a blur removes.
    truth = 500.0 + 6.0 * xx + 80.0 * np.sin(xx / 2.0) * np.cos(yy / 3.0)
    mask = np.zeros(SHAPE, bool)
    mask[10:-10, 10:-10] = True
    return truth, mask


def noisy(truth, variance_factor, count, rng):
    """Gaussian realisations with var = variance_factor · truth (so RN = variance_factor)."""
    return truth + rng.standard_normal((count, *truth.shape)) * np.sqrt(variance_factor * truth)


def test_pure_noise_has_known_rn_and_no_bias():
    truth, mask = truth_and_mask()
    rng = np.random.default_rng(0)
    reference = noisy(truth, 0.1, 10, rng)
    group = noisy(truth, 0.2, 5, rng)
    protocol, exact = mnse(group, reference, mask), exact_noise_bias(group, truth, mask)
    print(protocol, exact)
    assert protocol.rn == pytest.approx(0.2, rel=0.05) and exact.rn == pytest.approx(0.2, rel=0.05)
    assert abs(protocol.b2) < 0.01 and abs(exact.b2) < 0.01
    assert protocol.mnse == pytest.approx(protocol.rn + protocol.b2, rel=1e-9)


def test_blur_shows_as_bias_and_mean_shift_does_not():
    truth, mask = truth_and_mask()
    rng = np.random.default_rng(1)
    reference = noisy(truth, 0.1, 10, rng)
    blurred = np.stack([ndimage.gaussian_filter(x, 3) for x in noisy(truth, 0.1, 5, rng)])
    shifted = noisy(truth, 0.1, 5, rng) * 1.02 + 5  # a gain/offset error, not blur
    blur, shift = mnse(blurred, reference, mask), mnse(shifted, reference, mask)
    print("blurred", blur, "shifted", shift)
    assert blur.b2 > 0.5 and blur.rn < 0.02
    assert abs(shift.b2) < 0.01  # removed by the first-order mean correction
    assert exact_noise_bias(shifted, truth, mask).b2 > abs(shift.b2) + 0.05  # the exact figure sees it


def test_snr_of_constant_signal():
    rng = np.random.default_rng(2)
    stack = 500.0 + 10.0 * rng.standard_normal((40, 80, 80))
    snr = snr_map(stack)
    print(f"median SNR {np.median(snr):.1f} (expected 50)")
    assert np.median(snr) == pytest.approx(50, rel=0.05)
    assert mean_snr(stack, np.ones((80, 80), bool)) == pytest.approx(50, rel=0.05)


def test_calcification_retention():
    phantom = make_phantom((256, 208), seed=3)
    args = (phantom.signal, phantom.calcifications, phantom.mask)
    assert calcification_retention(phantom.signal, *args) == pytest.approx(1.0)
    blurred = calcification_retention(ndimage.gaussian_filter(phantom.signal, 2.0), *args)
    print(f"contrast kept after a 2 px blur: {blurred:.2f}")
    assert blurred < 0.8


def test_input_checks():
    truth, mask = truth_and_mask()
    with pytest.raises(ValueError, match="at least 2"):
        exact_noise_bias(truth[None], truth, mask)
    with pytest.raises(ValueError, match="positive"):
        exact_noise_bias(np.stack([truth, truth]), truth - 2000, mask)


def test_a_group_gets_every_figure_once_and_one_table():
    phantom = make_phantom((256, 208), seed=3)
    truth, mask = phantom.signal, phantom.mask
    rng = np.random.default_rng(5)
    reference = noisy(truth, 0.1, 6, rng)
    stack = noisy(truth, 0.2, 3, rng)
    row = evaluate_group("LD", stack, reference, truth, phantom.calcifications, mask, seconds=1.5)
    assert row.protocol == mnse(stack, reference, mask) and row.exact == exact_noise_bias(stack, truth, mask)
    assert row.mean_snr == pytest.approx(mean_snr(stack, mask), rel=1e-12)
    expected_retention = calcification_retention(stack.mean(axis=0), truth, phantom.calcifications, mask)
    assert 0 < row.calcification_retention == pytest.approx(expected_retention, rel=1e-12)
    assert np.isnan(row.snr_map[~mask]).all() and np.isfinite(row.snr_map[mask]).all()

    record = figures_record(row)
    assert tuple(record) == RECORD_FIELDS
    assert record["method"] == "LD" and record["seconds_per_image"] == 1.5
    assert record["rn_pct"] == pytest.approx(100 * row.protocol.rn)
    assert record["exact_b2_pct"] == pytest.approx(100 * row.exact.b2)
    table = markdown_table([row])
    print(table)
    header, rule, line = table.splitlines()
    assert header.count("|") == rule.count("|") == line.count("|") == 11
    assert line.startswith(f"| LD | {record['mnse_pct']:.2f} | {record['rn_pct']:.2f} |") and line.endswith("| 1.50 |")


def test_the_evaluation_module_needs_no_dicom_network_database_or_configuration():
    code = (
        "import sys\n"
        "import dicom_node.sim.evaluation\n"
        "heavy = ('pydicom', 'pynetdicom', 'sqlalchemy', 'torch', 'dicom_node.config', 'dicom_node.imaging')\n"
        "print(sorted(name for name in heavy if name in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
