"""Fixtures for root tests (tests/conftest.py marks everything here ``root``)."""

from __future__ import annotations

import pytest

#: Every lab-level test runs on both data planes (``[cluster] dataplane``).
BACKENDS = ("nft", "xdp")


@pytest.fixture(scope="module", params=BACKENDS)
def lab_backend(request: pytest.FixtureRequest) -> str:
    """The data plane of the lab a test module builds (the module runs once per backend)."""
    return str(request.param)
