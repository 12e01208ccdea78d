"""Fixtures for root tests (tests/conftest.py marks everything here ``root``)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

#: Every lab-level test runs on both data planes (``[cluster] dataplane``).
BACKENDS = ("nft", "xdp")


@pytest.fixture(scope="module", params=BACKENDS)
def lab_backend(request: pytest.FixtureRequest) -> str:
    """The data plane of the lab a test module builds (the module runs once per backend)."""
    return str(request.param)


@pytest.fixture(scope="session")
def bpf_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A BPF filesystem of the test session's own (a fresh machine may have none mounted at
    /sys/fs/bpf); unmounting it at the end frees whatever a failed test left pinned."""
    d = tmp_path_factory.mktemp("bpffs")
    subprocess.run(["mount", "-t", "bpf", "bpf", str(d)], check=True, capture_output=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False, capture_output=True)
