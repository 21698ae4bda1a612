"""The evaluation protocol on stacks whose answer is known analytically."""

import numpy as np
import pytest
from scipy import ndimage

from dicom_node.sim.evaluation import calcification_retention, exact_noise_bias, mean_snr, mnse, snr_map
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
