"""A synthetic raw ("FOR PROCESSING") mammogram whose noise-free truth is known.

The detector is linear, so the raw signal above the offset τ is proportional to the fluence
that reaches it: an incident field (with the anode heel effect) attenuated by Beer–Lambert
along the compressed breast's thickness profile, its fibroglandular texture and its
microcalcifications. Noise is added separately by `dicom_node.sim.acquisition.acquire`.

Sizes are physical (mm): the outline, compressed thickness and texture scale with the image's
extent, the calcifications keep their 100–500 µm. The default pitch, 0.2 mm (about 3× a Hologic
detector's 70 µm), makes the default 1024×832 image a 205 × 166 mm field holding a real
compressed breast: 90–140 mm chest wall to nipple, 145–195 mm along the chest wall, 30–60 mm
thick with the thickness falling over the last 10–20 mm to the skin line. At 0.2 mm the smallest
calcifications are sub-pixel (a 100 µm one darkens its pixel by about 1 %), as on a binned
detector; each still marks at least its centre pixel in `Phantom.calcifications`.

The pitch also sets how much texture and detail a pixel holds: a study standing for the node's
native-resolution data (70 µm) passes `pixel_spacing_mm=0.07` (a small image is then a small
breast, at the 20 mm thickness floor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import fft

# Linear attenuation of fibroglandular over adipose tissue near 20 keV (ICRU 44: 0.80 / 0.46 cm⁻¹).
GLANDULAR_TO_ADIPOSE = 1.75
# Projected glandular fraction: mean and spread of the texture around it.
MEAN_GLANDULAR_FRACTION = 0.3
GLANDULAR_FRACTION_STD = 0.1
# Extra linear attenuation of a calcification over the tissue it displaces, for an effective
# energy of a W/Rh–Ag beam behind a breast (pure hydroxyapatite is ~1.5 mm⁻¹ at 20 keV; real
# calcifications are less dense).
CALCIFICATION_ATTENUATION_PER_MM = 0.8
CALCIFICATION_DIAMETER_UM = (100.0, 500.0)
CLUSTER_RADIUS_MM = 2.5
# Beyond this scale the texture's spectrum flattens (a breast has no structure larger than itself).
LARGEST_STRUCTURE_MM = 30.0
# Sub-samples per pixel side when rendering calcifications (the detector integrates fluence).
SUPERSAMPLING = 8
# Default detector pitch: the default 1024×832 image then spans a real compressed breast.
DEFAULT_PIXEL_SPACING_MM = 0.2
# Compressed thickness drawn as this fraction of the breast's depth (chest wall to nipple), within
# the limits below: 90–140 mm deep breasts come out 30–60 mm thick.
THICKNESS_PER_DEPTH = (0.33, 0.43)
THICKNESS_LIMITS_MM = (20.0, 70.0)


@dataclass(frozen=True)
class Calcification:
    row: float  # centre, pixels (sub-pixel)
    col: float
    diameter_um: float
    cluster: int  # index of the cluster it belongs to


@dataclass
class Phantom:
    signal: np.ndarray  # float64 noise-free raw signal at full dose, ADU above the offset τ
    mask: np.ndarray  # bool, the breast
    calcifications: np.ndarray  # bool, pixels covered (≥ half) by a calcification, or holding its centre
    calc_clusters: list[Calcification]  # every calcification, tagged with its cluster
    pixel_spacing_mm: float
    thickness_map_mm: np.ndarray  # float64 path length through the compressed breast (0 outside it)


def make_phantom(
    shape: tuple[int, int] = (1024, 832),
    seed: int = 0,
    pixel_spacing_mm: float = DEFAULT_PIXEL_SPACING_MM,
    background_level: float = 12000.0,
    tissue_level: float = 1000.0,
    chest_wall: Literal["left", "right"] | None = None,
    thickness_mm: float | None = None,
    n_clusters: int | None = None,
    heel: float = 0.1,
    texture_beta: float = 3.0,
) -> Phantom:
    """A Hologic-like raw frame: direct exposure at `background_level` (at the chest wall) and
    `tissue_level` behind the full-thickness breast of mean glandularity. The exposure is
    set like an AEC would, so `tissue_level` holds whatever the (random) compressed thickness.
    `chest_wall`, `thickness_mm` and `n_clusters` are drawn from `seed` when left out.

    `pixel_spacing_mm` sets the physical size of the field: the breast's outline fills a similar
    share of any image, so a coarser pitch makes a larger (and thicker) breast; the calcifications
    keep their physical size. The default (0.2 mm) makes 1024×832 a realistic breast."""
    if not 0 < tissue_level < background_level:
        raise ValueError("need 0 < tissue_level < background_level")
    if not (np.isfinite(pixel_spacing_mm) and pixel_spacing_mm > 0):
        raise ValueError(f"pixel_spacing_mm must be positive, got {pixel_spacing_mm}")
    rng = np.random.default_rng(seed)
    rows, cols = shape
    side = chest_wall or str(rng.choice(["left", "right"]))

    # Semi-elliptical outline attached to the chest wall, built with the chest wall on the left.
    half_height = rng.uniform(0.35, 0.47) * rows
    depth = rng.uniform(0.55, 0.85) * cols
    centre_row = rows / 2 + rng.uniform(-0.03, 0.03) * rows
    dr = (np.arange(rows)[:, None] - centre_row) / half_height
    dc = (np.arange(cols)[None, :] + 0.5) / depth  # the chest wall is the image edge, at col −0.5
    rho = np.hypot(dr, dc)
    mask = rho < 1.0
    # First-order distance to the skin line (smooth, sub-pixel): (1 − ρ)/|∇ρ|.
    distance_mm = (1.0 - rho) * rho / np.hypot(dr / half_height, dc / depth) * pixel_spacing_mm

    if thickness_mm is None:
        share = rng.uniform(*THICKNESS_PER_DEPTH)
        thickness_mm = float(np.clip(share * depth * pixel_spacing_mm, *THICKNESS_LIMITS_MM))
    thickness = _compressed_thickness(distance_mm, thickness_mm)

    texture = power_law_texture(shape, texture_beta, rng, pixel_spacing_mm / LARGEST_STRUCTURE_MM)
    glandular = np.clip(MEAN_GLANDULAR_FRACTION + GLANDULAR_FRACTION_STD * texture, 0.0, 1.0)
    relative_mu = (1 + (GLANDULAR_TO_ADIPOSE - 1) * glandular) / (
        1 + (GLANDULAR_TO_ADIPOSE - 1) * MEAN_GLANDULAR_FRACTION
    )
    mean_mu = np.log(background_level / tissue_level) / thickness_mm
    incident = background_level * _heel_profile(shape, heel, rng)
    signal = incident * np.exp(-mean_mu * relative_mu * thickness)

    clusters = int(rng.integers(2, 5)) if n_clusters is None else n_clusters
    full_thickness = mask & (thickness >= 0.95 * thickness.max())
    calcs = _place_calcifications(full_thickness, clusters, pixel_spacing_mm, rng)
    transmission, calc_mask = _render_calcifications(shape, calcs, pixel_spacing_mm)
    signal *= transmission

    if side == "right":
        signal, mask, calc_mask = signal[:, ::-1].copy(), mask[:, ::-1].copy(), calc_mask[:, ::-1].copy()
        thickness = thickness[:, ::-1].copy()
        calcs = [Calcification(c.row, cols - 1 - c.col, c.diameter_um, c.cluster) for c in calcs]
    return Phantom(signal, mask, calc_mask, calcs, pixel_spacing_mm, thickness)


def flat_field(shape: tuple[int, int], level: float, heel: float = 0.1, seed: int = 0) -> np.ndarray:
    """Noise-free open-field signal: `level` at the chest wall (column 0), falling by about
    `heel` towards the anode side, with a slight transverse curvature drawn from `seed`."""
    return level * _heel_profile(shape, heel, np.random.default_rng(seed))


def power_law_texture(shape: tuple[int, int], beta: float, rng: np.random.Generator, cutoff: float) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian field with power spectrum ∝ (f² + cutoff²)^(−β/2)
    (f in cycles per pixel). Drawn on a larger grid and cropped, so it does not wrap around."""
    padded = tuple(fft.next_fast_len(int(n * 1.25)) for n in shape)
    f2 = fft.fftfreq(padded[0])[:, None] ** 2 + fft.rfftfreq(padded[1])[None, :] ** 2
    amplitude = (f2 + cutoff**2) ** (-beta / 4)
    field = fft.irfft2(fft.rfft2(rng.standard_normal(padded)) * amplitude, s=padded)
    field = field[: shape[0], : shape[1]]
    return (field - field.mean()) / field.std()


def _compressed_thickness(distance_mm: np.ndarray, thickness_mm: float) -> np.ndarray:
    """The compressed breast's edge is a half-cylinder of radius T/2: the path length falls
    from T to 0 over the last T/2 before the skin line."""
    radius = thickness_mm / 2
    inset = np.clip(distance_mm, 0.0, radius)
    return 2 * np.sqrt(radius**2 - (radius - inset) ** 2)


def _heel_profile(shape: tuple[int, int], heel: float, rng: np.random.Generator) -> np.ndarray:
    """Relative incident fluence: 1 at the chest wall (cathode side, column 0), 1 − heel at
    the far edge (anode side), a smooth quadratic surface."""
    along = np.linspace(0.0, 1.0, shape[1])
    across = np.linspace(-1.0, 1.0, shape[0])
    linear_share = rng.uniform(0.3, 0.7)
    curvature = rng.uniform(0.0, 0.2) * heel
    return (1 - curvature * across[:, None] ** 2) * (1 - heel * (linear_share * along + (1 - linear_share) * along**2))[
        None, :
    ]


def _place_calcifications(
    region: np.ndarray, n_clusters: int, pixel_spacing_mm: float, rng: np.random.Generator
) -> list[Calcification]:
    """Clusters of 5–12 calcifications spread over a few mm, centred inside `region`."""
    candidates = np.argwhere(region)
    if n_clusters and not len(candidates):
        raise ValueError("no full-thickness breast region to place calcifications in")
    spread_px = CLUSTER_RADIUS_MM / pixel_spacing_mm / 2
    margin = CALCIFICATION_DIAMETER_UM[1] / 1000 / pixel_spacing_mm + 2
    rows, cols = region.shape
    calcs = []
    for cluster in range(n_clusters):
        centre = candidates[rng.integers(len(candidates))]
        count = int(rng.integers(5, 13))
        positions = centre + rng.normal(0.0, spread_px, size=(count, 2))
        diameters = rng.uniform(*CALCIFICATION_DIAMETER_UM, size=count)
        for (row, col), diameter in zip(positions, diameters, strict=True):
            inside = margin <= row < rows - margin and margin <= col < cols - margin
            if inside and region[int(round(row)), int(round(col))]:
                calcs.append(Calcification(float(row), float(col), float(diameter), cluster))
    return calcs


def _render_calcifications(
    shape: tuple[int, int], calcs: list[Calcification], pixel_spacing_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-integrated transmission of spherical calcifications (path 2√(R² − ρ²)) and the
    mask of the pixels they occupy."""
    transmission = np.ones(shape)
    calc_mask = np.zeros(shape, dtype=bool)
    sub = (np.arange(SUPERSAMPLING) + 0.5) / SUPERSAMPLING - 0.5
    for calc in calcs:
        radius = calc.diameter_um / 2000 / pixel_spacing_mm
        r0, c0 = int(np.floor(calc.row - radius)) - 1, int(np.floor(calc.col - radius)) - 1
        r1, c1 = int(np.ceil(calc.row + radius)) + 2, int(np.ceil(calc.col + radius)) + 2
        sub_rows = (np.arange(r0, r1)[:, None] + sub).ravel() - calc.row
        sub_cols = (np.arange(c0, c1)[:, None] + sub).ravel() - calc.col
        chord2 = radius**2 - sub_rows[:, None] ** 2 - sub_cols[None, :] ** 2
        path_mm = 2 * np.sqrt(np.maximum(chord2, 0.0)) * pixel_spacing_mm
        blocks = (r1 - r0, SUPERSAMPLING, c1 - c0, SUPERSAMPLING)
        pixel_transmission = np.exp(-CALCIFICATION_ATTENUATION_PER_MM * path_mm).reshape(blocks).mean(axis=(1, 3))
        transmission[r0:r1, c0:c1] *= pixel_transmission
        coverage = (chord2 > 0).reshape(blocks).mean(axis=(1, 3))
        calc_mask[r0:r1, c0:c1] |= coverage >= 0.5
        calc_mask[int(round(calc.row)), int(round(calc.col))] = True
    return transmission, calc_mask
