"""A job's QC figures against the configured thresholds: which are out of range, and by how much.

A flag never drops an image or holds it back by itself (a profile's `hold_flagged` does); it tells
QA staff which figure to look at. A figure that could not be measured (NaN, or absent) is not
flagged: the job detail shows it as missing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from dicom_node.config import Threshold


def qc_flags(qc: Mapping[str, float], thresholds: Mapping[str, Threshold]) -> list[dict[str, Any]]:
    """One flag per figure outside its [min, max]: {figure, value, min, max, message}."""
    flags = []
    for figure, bounds in thresholds.items():
        value = qc.get(figure)
        if value is None or not math.isfinite(value):
            continue
        if bounds.min is not None and value < bounds.min:
            side, bound = "below its minimum", bounds.min
        elif bounds.max is not None and value > bounds.max:
            side, bound = "above its maximum", bounds.max
        else:
            continue
        by = abs(value - bound)
        relative = f" ({by / abs(bound):.0%})" if bound else ""
        flags.append(
            {
                "figure": figure,
                "value": value,
                "min": bounds.min,
                "max": bounds.max,
                "message": f"{figure} {value:.4g} {side} {bound:g} by {by:.3g}{relative}",
            }
        )
    return flags
