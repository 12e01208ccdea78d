"""Shared pytest configuration: root-only tests skip with a reason when not root."""

from __future__ import annotations

import os
import shutil

import pytest
from hypothesis import HealthCheck, settings

# Shared 2-core machines: wall-clock deadlines make property tests flaky, not stricter.
settings.register_profile("multihost", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("multihost")

ROOT_TOOLS = ("nft", "ip")


def root_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces and nftables); run `make test` as root"
    missing = [t for t in ROOT_TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing tools {missing}; `make setup` as root installs them"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Everything under tests/netns/ is a root test, marked or not.
    for item in items:
        if "/tests/netns/" in str(item.path):
            item.add_marker(pytest.mark.root)
    reason = root_skip_reason()
    if reason is None:
        return
    marker = pytest.mark.skip(reason=reason)
    for item in items:
        if "root" in item.keywords:
            item.add_marker(marker)
