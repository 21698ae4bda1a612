"""Fixtures shared by several test files.

Helpers that take arguments live in the helper modules: `peers` (real DICOM peers, `wait_until`,
`wait_for_port`) and `dicomtools` (the Debian DICOM tools, the simulated detector, low-dose
phantom mammograms). Node code is imported inside the fixtures, so that a package being
reorganised breaks only the tests that use it, never the collection of the whole suite.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dicomtools import sim_noise_model
from peers import Storescp, start_storescp


@pytest.fixture(scope="session")
def sim_noise():
    """The simulated detector's noise model (λ, σ_e, τ), as the embedded defaults' SIM-0001 calibrates it."""
    return sim_noise_model()


@pytest.fixture
def config_file(tmp_path: Path) -> Callable[..., Path]:
    """Write configuration text to a file under tmp_path (node.toml unless named) and return its path."""

    def write(text: str, name: str = "node.toml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Callable[..., Storescp]]:
    """Start DCMTK storescp receivers: ``storescp("+xt", ae_title="PACS")``; each listens before it is
    returned and is killed when the test ends, pass or fail."""
    started: list[Storescp] = []

    def start(*options: str, ae_title: str = "STORESCP") -> Storescp:
        peer = start_storescp(tmp_path / f"storescp{len(started)}", *options, ae_title=ae_title)
        started.append(peer)
        return peer

    try:
        yield start
    finally:
        for peer in started:
            peer.stop()
