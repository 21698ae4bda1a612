"""The model-based path on a synthetic phantom at half dose, judged by the seed paper's protocol.

Restoration aims at the full-dose noise level (RN ≈ RN_FD) with a small bias B², and must clearly
beat the noisy input's MNSE. Two detectors with different noise settings guard against a method
that only works for one. A third case has CsI-like correlated noise and compares BM3D told the
noise spectrum (the noise model carries the GAT-domain kernel κ) with BM3D assuming white noise.
"""

import numpy as np
import pytest

from dicom_node.restore.calibration import calibrate_flat_fields, kernel_neighbour_correlations
from dicom_node.restore.noise import NoiseModel
from dicom_node.restore.registry import create_restorer
from dicom_node.sim.acquisition import acquire, crosstalk_kernel
from dicom_node.sim.evaluation import evaluate_group
from dicom_node.sim.phantom import flat_field, make_phantom

from dicomtools import sim_noise_model

DOSE = 0.5
REALISATIONS = 3
GT_REALISATIONS = 10
PITCH = 0.07  # mm: native-resolution data (70 µm), as these figures were set for; not the simulator's default


def figures_of(groups: dict, reference, phantom, label: str) -> dict:
    """(protocol, exact) figures of each group (`evaluate_group`; "FD" first), printed with RN/RN_FD."""
    figures = {}
    for group, stack in groups.items():
        result = evaluate_group(group, stack, reference, phantom.signal, phantom.calcifications, phantom.mask)
        protocol, exact = result.protocol, result.exact
        figures[group] = (protocol, exact)
        print(
            f"{label} {group}: RN/RN_FD {protocol.rn / figures['FD'][0].rn:.3f} | MNSE {100 * protocol.mnse:.2f}% "
            f"RN {100 * protocol.rn:.2f}% B² {100 * protocol.b2:.3f}% | exact RN {100 * exact.rn:.2f}% "
            f"B² {100 * exact.b2:.3f}% | calcification contrast kept {result.calcification_retention:.3f}"
        )
    return figures


DETECTORS = {  # noise model, breast and direct-exposure signal at full dose (within 14 bits)
    "a-Se, Hologic-like": (sim_noise_model(), 1000.0, 12000.0),  # SIM-0001 of the embedded defaults
    "noisier, high offset": (NoiseModel(0.35, 8.0, 200.0), 1500.0, 9000.0),
}


@pytest.mark.parametrize("name", list(DETECTORS))
def test_mb_reaches_full_dose_noise_with_small_bias(name):
    noise, tissue_level, background_level = DETECTORS[name]
    phantom = make_phantom(
        (288, 224), seed=21, pixel_spacing_mm=PITCH, tissue_level=tissue_level, background_level=background_level
    )
    rng = np.random.default_rng(5)
    restorer = create_restorer("gat-bm3d")  # the default: the spectral blend
    plain = create_restorer("gat-bm3d", blend="plain")  # science.md's blend, kept to compare against

    def offset_free(stack):
        return np.stack(stack).astype(np.float64) - noise.offset

    reference = offset_free([acquire(phantom.signal, noise, 1.0, rng) for _ in range(GT_REALISATIONS)])
    full = offset_free([acquire(phantom.signal, noise, 1.0, rng) for _ in range(REALISATIONS)])
    low_raw = [acquire(phantom.signal, noise, DOSE, rng) for _ in range(REALISATIONS)]
    low = offset_free(low_raw) / DOSE
    restored = offset_free([restorer.restore(z.astype(np.float64), noise, DOSE).image for z in low_raw])
    kept = offset_free([plain.restore(z.astype(np.float64), noise, DOSE).image for z in low_raw])

    figures = figures_of({"FD": full, "LD": low, "MB": restored, "MB plain": kept}, reference, phantom, name)

    fd, ld, mb, pl = (figures[g][0] for g in ("FD", "LD", "MB", "MB plain"))
    fd_exact, mb_exact, pl_exact = figures["FD"][1], figures["MB"][1], figures["MB plain"][1]
    print(
        f"{name}: RN/RN_FD spectral {mb.rn / fd.rn:.3f}, plain {pl.rn / fd.rn:.3f}; "
        f"MNSE/MNSE_LD spectral {mb.mnse / ld.mnse:.3f}, plain {pl.mnse / ld.mnse:.3f}"
    )
    # The plain blend: far below the input's noise (RN_LD ≈ 2·RN_FD) with a small bias, but short
    # of the full-dose level on a textured breast (the BM3D estimate keeps some noise).
    assert 1.1 < pl.rn / fd.rn < 1.8 and 1.1 < pl_exact.rn / fd_exact.rn < 1.8
    assert pl.mnse < 0.85 * ld.mnse
    assert pl.b2 < 0.05 * fd.rn and pl_exact.b2 < 0.05 * fd_exact.rn
    # The default (spectral) blend reaches the full-dose noise level (white detector noise), paying
    # in bias, and so lands closer to full dose by the protocol's MNSE.
    assert 0.9 < mb.rn / fd.rn < 1.1 and 0.9 < mb_exact.rn / fd_exact.rn < 1.1
    assert mb.mnse < pl.mnse and mb_exact.b2 > pl_exact.b2


CROSSTALK = 0.5  # dicom_node.sim.acquisition.acquire(..., crosstalk=0.5): CsI-like correlated quantum noise


def measured_gat_kernel(noise: NoiseModel, level: float, rng: np.random.Generator) -> np.ndarray:
    """The GAT-domain noise kernel κ, measured as a site would: flat fields simulated like the
    phantom's frames (same detector, same crosstalk) around the breast's low-dose level, two
    exposures with two repeats each, given to `calibrate_flat_fields`.

    Measured rather than taken from the crosstalk kernel K because the GAT-domain noise is not
    K ⊛ n: electronic noise (white) and rounding dilute the correlation, by the share of quantum
    noise in the variance (about 0.87 here); the test checks the measurement against that share.
    """
    exposures = [0.8, 0.8, 1.25, 1.25]  # around the level (the correlation depends on it)
    images = [acquire(flat_field((256, 256), level * e), noise, 1.0, rng, crosstalk=CROSSTALK) for e in exposures]
    kernel = calibrate_flat_fields(images, exposures).noise_kernel
    assert kernel is not None, "the calibration found the crosstalk-correlated noise white"
    return kernel


def test_mb_on_correlated_noise_with_and_without_the_spectrum():
    """Same frames, same blend (plain): BM3D assuming white noise vs BM3D told the spectrum."""
    white = sim_noise_model()
    phantom = make_phantom((224, 176), seed=21, pixel_spacing_mm=PITCH, tissue_level=1000.0, background_level=12000.0)
    rng = np.random.default_rng(5)
    level = float(np.median(DOSE * phantom.signal[phantom.mask]))
    kernel = measured_gat_kernel(white, level, rng)
    quantum_share = white.gain * level / (white.gain * level + white.electronic_noise**2)
    expected = quantum_share * kernel_neighbour_correlations(crosstalk_kernel(CROSSTALK))[1]
    print(
        f"\nGAT-domain κ measured at {level:.0f} ADU: neighbour correlation {kernel_neighbour_correlations(kernel)[1]:.3f} "
        f"(crosstalk kernel × quantum share {quantum_share:.2f}: {expected:.3f}); κ:\n"
        f"{np.array2string(kernel, precision=3)}"
    )
    assert abs(kernel_neighbour_correlations(kernel)[1] - expected) < 0.05
    coloured = NoiseModel(white.gain, white.electronic_noise, white.offset, kernel)
    restorer = create_restorer("gat-bm3d", blend="plain")

    def offset_free(stack):
        return np.stack(stack).astype(np.float64) - white.offset

    def frames(dose, count):
        return [acquire(phantom.signal, white, dose, rng, crosstalk=CROSSTALK) for _ in range(count)]

    reference, full = offset_free(frames(1.0, GT_REALISATIONS)), offset_free(frames(1.0, REALISATIONS))
    low_raw = [z.astype(np.float64) for z in frames(DOSE, REALISATIONS)]
    groups = {"FD": full, "LD": offset_free(low_raw) / DOSE}
    for label, model in (("MB white BM3D", white), ("MB spectrum BM3D", coloured)):
        restorations = [restorer.restore(z, model, DOSE) for z in low_raw]
        assert restorations[0].provenance.options["noise"] == ("white" if model.kernel is None else "coloured")
        groups[label] = offset_free([r.image for r in restorations])

    figures = figures_of(groups, reference, phantom, "correlated")
    (ld, _), (mb, mb_exact), (sp, sp_exact) = (figures[g] for g in ("LD", "MB white BM3D", "MB spectrum BM3D"))
    # Robust (4 noise/phantom seeds: RN −4 to −6 %): told the spectrum, BM3D leaves less noise in its
    # estimate, so the plain blend's RN and MNSE fall (only a few per cent: most of this noise is
    # low-frequency, where no denoiser removes much). B² and calcification contrast are printed, not
    # asserted: here B² fell on every seed, but it rose with a milder Gaussian crosstalk (σ 0.5 px)
    # and in science.md; the contrast moved by less than 0.01.
    assert sp.rn < mb.rn < ld.rn and sp_exact.rn < mb_exact.rn
    assert sp.mnse < mb.mnse < ld.mnse
