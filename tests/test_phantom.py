"""The synthetic phantom: plausible raw-mammogram physics, deterministic per seed, fast."""

import time

import numpy as np
import pytest
from scipy import ndimage

from dicom_node.sim.phantom import flat_field, make_phantom, power_law_texture


def test_shape_determinism_and_speed():
    started = time.perf_counter()
    phantom = make_phantom((1024, 832), seed=0)
    elapsed = time.perf_counter() - started
    print(f"1024×832 phantom in {elapsed:.2f} s")
    assert elapsed < 20  # a sanity bound, not a benchmark
    assert phantom.signal.shape == (1024, 832) and phantom.signal.dtype == np.float64
    assert phantom.mask.dtype == bool and phantom.calcifications.dtype == bool
    again = make_phantom((1024, 832), seed=0)
    assert np.array_equal(again.signal, phantom.signal)
    assert not np.array_equal(make_phantom((1024, 832), seed=1).signal, phantom.signal)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_physics_of_the_image(seed):
    phantom = make_phantom((512, 416), seed=seed)
    signal, mask = phantom.signal, phantom.mask
    print(
        f"seed {seed}: breast fraction {mask.mean():.2f}, breast median {np.median(signal[mask]):.0f}, "
        f"background median {np.median(signal[~mask]):.0f}, calcifications {len(phantom.calc_clusters)}"
    )
    assert 0.15 < mask.mean() < 0.9
    assert np.median(signal[~mask]) > 2 * np.median(signal[mask])  # direct exposure is brighter
    assert signal.max() < 2**14 - 100  # within 14 bits at full dose, before noise
    assert signal.min() > 0
    # The signal rises towards the skin line, where the compressed breast thins.
    distance = ndimage.distance_transform_edt(mask)
    assert np.median(signal[mask & (distance < 5)]) > 1.3 * np.median(signal[mask & (distance > 60)])
    # Calcifications: 100–500 µm, darker than their surround.
    diameters = [c.diameter_um for c in phantom.calc_clusters]
    assert diameters and min(diameters) >= 100 and max(diameters) <= 500
    calcs = phantom.calcifications
    ring = ndimage.binary_dilation(calcs, iterations=4) & ~ndimage.binary_dilation(calcs, iterations=1)
    assert np.mean(signal[calcs]) < np.mean(signal[ring])
    assert (calcs & ~mask).sum() == 0


def radial_spectral_slope(image: np.ndarray, frequencies: np.ndarray) -> float:
    """Slope of log power against log radial frequency (frequency in FFT bins)."""
    n = image.shape[0]
    spectrum = np.abs(np.fft.fftshift(np.fft.fft2(image))) ** 2
    radius = np.hypot(*(np.indices(spectrum.shape) - n // 2)).astype(int)
    radial = np.bincount(radius.ravel(), spectrum.ravel()) / np.bincount(radius.ravel())
    return float(np.polyfit(np.log(frequencies), np.log(radial[frequencies]), 1)[0])


def test_texture_has_a_power_law_spectrum():
    field = power_law_texture((512, 512), 3.0, np.random.default_rng(0), cutoff=1e-3)
    slope = radial_spectral_slope(field, np.arange(8, 120))
    print(f"fitted spectral slope of the texture field {slope:.2f} (β = 3)")
    assert slope == pytest.approx(-3.0, abs=0.3)


@pytest.mark.parametrize("seed", [0, 1])
def test_breast_attenuation_has_a_power_law_spectrum(seed):
    """−log(signal) in a full-thickness region: the texture seen through Beer–Lambert."""
    phantom = make_phantom((768, 768), seed=seed, chest_wall="left", thickness_mm=10, n_clusters=0)
    rows, cols = slice(304, 464), slice(8, 168)
    assert phantom.mask[rows, cols].all()
    attenuation = -np.log(phantom.signal[rows, cols])
    yy, xx = np.indices(attenuation.shape)
    plane = np.c_[np.ones(yy.size), yy.ravel(), xx.ravel()]  # removes the heel gradient
    coefficients = np.linalg.lstsq(plane, attenuation.ravel(), rcond=None)[0]
    detrended = attenuation - (plane @ coefficients).reshape(attenuation.shape)
    window = np.outer(np.hanning(160), np.hanning(160))
    slope = radial_spectral_slope(detrended * window, np.arange(4, 50))
    print(f"seed {seed}: spectral slope of the breast's attenuation {slope:.2f} (β = 3)")
    assert slope == pytest.approx(-3.0, abs=0.4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_breast_is_attached_to_the_chosen_chest_wall(side):
    phantom = make_phantom((256, 208), seed=4, chest_wall=side)
    chest, far = (0, -1) if side == "left" else (-1, 0)
    labels, count = ndimage.label(phantom.mask)
    print(f"{side}: {phantom.mask[:, chest].sum()} breast pixels on the chest-wall column, {count} component(s)")
    assert count == 1
    assert phantom.mask[:, chest].mean() > 0.5 and not phantom.mask[:, far].any()
    assert not phantom.mask[0].any() and not phantom.mask[-1].any()


def test_flat_field_has_a_heel_gradient():
    field = flat_field((128, 256), level=2000.0, heel=0.2)
    assert field[:, 0].mean() == pytest.approx(2000.0, rel=0.05)
    assert field[:, -1].mean() < 0.85 * field[:, 0].mean()
