"""The synthetic phantom: plausible raw-mammogram physics, deterministic per seed, fast."""

import time

import numpy as np
import pytest
from scipy import ndimage

from dicom_node.sim.phantom import (
    CALCIFICATION_ATTENUATION_PER_MM,
    DEFAULT_PIXEL_SPACING_MM,
    THICKNESS_LIMITS_MM,
    flat_field,
    make_phantom,
    power_law_texture,
)


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


def distance_to_skin_mm(phantom) -> np.ndarray:
    """Distance of each breast pixel to the skin line, mm (the chest wall, an image edge, is not skin)."""
    padded = np.pad(phantom.mask, ((0, 0), (1, 1)), mode="edge")
    return ndimage.distance_transform_edt(padded)[:, 1:-1] * phantom.pixel_spacing_mm


def breast_extent_mm(phantom) -> tuple[float, float]:
    """(along the chest wall, chest wall to nipple) of the breast, mm."""
    rows, cols = np.nonzero(phantom.mask.any(axis=1))[0], np.nonzero(phantom.mask.any(axis=0))[0]
    return (rows[-1] - rows[0] + 1) * phantom.pixel_spacing_mm, (cols[-1] - cols[0] + 1) * phantom.pixel_spacing_mm


@pytest.mark.parametrize("seed", range(5))
def test_default_image_holds_a_physically_sized_breast(seed):
    """At the default pitch the default image is a real compressed breast, thicker than the 20 mm
    floor over most of it (at 70 µm the field was 72 × 58 mm and every breast sat at the floor)."""
    phantom = make_phantom(seed=seed)
    assert phantom.pixel_spacing_mm == DEFAULT_PIXEL_SPACING_MM
    along, depth = breast_extent_mm(phantom)
    thickness = phantom.thickness_map_mm
    compressed = thickness.max()
    above_floor = np.mean(thickness[phantom.mask] > THICKNESS_LIMITS_MM[0] + 0.5)
    # Where the thickness falls: from 90 % of the compressed thickness to the skin line.
    falloff = distance_to_skin_mm(phantom)[phantom.mask & (thickness < 0.9 * compressed)].max()
    print(
        f"seed {seed}: breast {along:.0f} mm along the chest wall, {depth:.0f} mm deep, {compressed:.1f} mm thick, "
        f"{100 * above_floor:.0f} % of it above the {THICKNESS_LIMITS_MM[0]:.0f} mm floor, fall-off over {falloff:.1f} mm"
    )
    assert 130 < along < 210 and 85 < depth < 150
    assert 30 <= compressed <= 65
    assert above_floor > 0.75
    assert 8 < falloff < 22
    assert np.all(thickness[~phantom.mask] == 0) and np.all(thickness[phantom.mask] > 0)


@pytest.mark.parametrize("seed", range(5))
def test_intensity_range_across_the_breast_is_realistic(seed):
    """Noise-free signal over the breast at least 5 mm inside the skin line (the last few mm rise
    steeply to the direct exposure): its spread, p99.5/p0.5 (robust to the calcifications), should
    lie in 3–10. Why: the tissue's attenuation, μ ≈ 0.05–0.07 mm⁻¹ near 20 keV (ICRU 44, 30 %
    glandular), over 40–60 mm gives the direct exposure about 12× the signal behind the breast (the
    default levels); 5 mm inside the skin line a half-cylinder edge leaves ~60 % of the thickness,
    a factor exp(0.4·μT) ≈ 2.5–3.5 brighter than the centre, and dense against fatty tissue adds
    about 1.5–2×: 3–7 in all, as in raw (FOR PROCESSING) mammograms, whose breast spans several
    times in signal without peripheral equalisation. The old 70 µm default, a 20 mm breast at the
    floor with μ = 0.12 mm⁻¹, gave 2.0–2.5."""
    phantom = make_phantom(seed=seed)
    signal, thickness = phantom.signal, phantom.thickness_map_mm
    inner = phantom.mask & (distance_to_skin_mm(phantom) >= 5.0)
    low, high = np.percentile(signal[inner], [0.5, 99.5])
    mean_mu = np.log(12000.0 / 1000.0) / thickness.max()  # the AEC's attenuation at the default levels
    print(
        f"seed {seed}: ≥ 5 mm inside the skin line the signal spans {low:.0f}–{high:.0f} ADU "
        f"(×{high / low:.2f}; max/min ×{signal[inner].max() / signal[inner].min():.2f}), "
        f"mean attenuation {mean_mu:.3f} /mm, direct exposure {np.median(signal[~phantom.mask]):.0f} ADU"
    )
    assert 3 < high / low < 10
    assert 0.035 < mean_mu < 0.09


def test_calcifications_stay_physical_and_visible_at_the_default_pitch():
    """Calcifications keep their size in mm (their integrated attenuation does not depend on the
    pitch) and, sub-pixel as the smallest are at 0.2 mm, each marks ≥ 1 px and darkens it."""
    diameters, footprints, darkest = [], [], []
    for seed in range(4):
        phantom = make_phantom(seed=seed)
        bare = make_phantom(seed=seed, n_clusters=0)  # the same breast without its calcifications
        transmission = phantom.signal / bare.signal
        labels, _ = ndimage.label(phantom.calcifications)
        for calc in phantom.calc_clusters:
            r, c = int(round(calc.row)), int(round(calc.col))
            assert phantom.calcifications[r, c]
            diameters.append(calc.diameter_um)
            footprints.append(np.sum(labels == labels[r, c]))
            darkest.append(1 - transmission[r - 2 : r + 3, c - 2 : c + 3].min())
    diameters, footprints, darkest = np.array(diameters), np.array(footprints), np.array(darkest)
    small, large = diameters < 200, diameters >= 300
    print(
        f"{len(diameters)} calcifications at {DEFAULT_PIXEL_SPACING_MM} mm: footprint ≥ {footprints.min()} px; "
        f"darkest pixel contrast: < 200 µm {100 * darkest[small].min():.1f}–{100 * darkest[small].max():.1f} %, "
        f"≥ 300 µm {100 * darkest[large].min():.1f}–{100 * darkest[large].max():.1f} %"
    )
    assert footprints.min() >= 1 and small.any() and large.any()
    assert darkest.min() > 0.0025  # a 100 µm sphere split over four 0.2 mm pixels: ≥ 0.26 % each
    assert darkest[large].min() > 0.1


@pytest.mark.parametrize("pixel_spacing_mm", [0.07, 0.1, 0.2])
def test_calcification_attenuation_is_pitch_independent(pixel_spacing_mm):
    """A lone calcification's integrated attenuation, Σ(1 − transmission)·pixel area, is that of a
    sphere of its diameter at any pitch (the detector integrates the fluence it removes)."""
    shape = (int(round(60 / pixel_spacing_mm)), int(round(50 / pixel_spacing_mm)))
    phantom = make_phantom(shape, seed=3, pixel_spacing_mm=pixel_spacing_mm, chest_wall="left", n_clusters=8)
    bare = make_phantom(shape, seed=3, pixel_spacing_mm=pixel_spacing_mm, chest_wall="left", n_clusters=0)
    deficit = 1 - phantom.signal / bare.signal
    box = int(np.ceil(0.6 / pixel_spacing_mm)) + 2
    errors = []
    for calc in phantom.calc_clusters:
        others = [o for o in phantom.calc_clusters if o is not calc]
        if min(np.hypot(o.row - calc.row, o.col - calc.col) for o in others) < 2 * box:
            continue  # neighbours would add their own attenuation
        r, c = int(round(calc.row)), int(round(calc.col))
        measured = deficit[r - box : r + box + 1, c - box : c + box + 1].sum() * pixel_spacing_mm**2
        radius = calc.diameter_um / 2000
        rho = np.linspace(0, radius, 2001)
        chord = 2 * np.sqrt(np.maximum(radius**2 - rho**2, 0))
        expected = np.trapezoid(2 * np.pi * rho * (1 - np.exp(-CALCIFICATION_ATTENUATION_PER_MM * chord)), rho)
        errors.append(measured / expected - 1)
    print(
        f"{pixel_spacing_mm} mm: {len(errors)} lone calcifications, integrated attenuation error {np.abs(errors).max():.3f}"
    )
    assert len(errors) >= 3
    assert np.abs(errors).max() < 0.05


def test_bad_pixel_spacing_is_refused():
    with pytest.raises(ValueError, match="pixel_spacing_mm"):
        make_phantom((64, 64), pixel_spacing_mm=0.0)
