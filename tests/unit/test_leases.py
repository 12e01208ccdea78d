"""The kernel lease bound (multihost.membership.leases.kernel_lease)."""

from __future__ import annotations

from multihost.membership.leases import NEVER, kernel_lease


def test_kernel_lease_is_the_earliest_peer_lease() -> None:
    assert kernel_lease([]) is None  # nobody alive could take over: no expiry
    assert kernel_lease([3.5, 2.0, 9.0]) == 2.0
    assert kernel_lease([3.5, None]) == NEVER  # a peer holds no valid lease of ours: lapsed
