"""Network normalisation round-trips: the trainer and the deep restorer share it."""

import numpy as np
import pytest

from dicom_node.errors import ConfigurationError
from dicom_node.restore.noise import NoiseModel
from dicom_node.restore.normalisation import Normalisation

NOISE = NoiseModel(0.1, 3.0, 50.0)


@pytest.mark.parametrize("domain", ["raw", "anscombe"])
def test_target_round_trips_to_raw(domain):
    norm = Normalisation(domain, scale=100.0 if domain == "anscombe" else 8000.0)
    full = np.linspace(200.0, 9000.0, 50)
    back = norm.from_network(norm.target(full, NOISE), NOISE)
    # The anscombe inverse is the unbiased one: exact on expectations, close on a single value.
    np.testing.assert_allclose(back, full, rtol=1e-6 if domain == "raw" else 2e-3)


def test_raw_input_is_on_the_full_dose_scale():
    norm = Normalisation("raw", 1000.0)
    half = np.array([NOISE.offset + 250.0])
    assert norm.to_network(half, NOISE, 0.5)[0] == pytest.approx(0.5)
    assert Normalisation.from_dict(norm.to_dict()) == norm
    with pytest.raises(ConfigurationError, match="domain"):
        Normalisation("log")
