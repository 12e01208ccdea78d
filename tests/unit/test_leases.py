"""The kernel lease bound (multihost.membership.leases.kernel_lease)."""

from __future__ import annotations

from multihost.membership.leases import NEVER, kernel_lease, quorum_lease


def test_kernel_lease_is_the_earliest_peer_lease() -> None:
    assert kernel_lease([]) is None  # nobody alive could take over: no expiry
    assert kernel_lease([3.5, 2.0, 9.0]) == 2.0
    assert kernel_lease([3.5, None]) == NEVER  # a peer holds no valid lease of ours: lapsed


def test_quorum_lease_is_when_the_majority_of_leases_ends() -> None:
    assert quorum_lease([], 1) is None  # alone a majority: no expiry
    assert quorum_lease([5.0, 2.0, 9.0], 4) == 5.0  # needs 2 peers: the 2nd latest
    assert quorum_lease([5.0, 2.0, 9.0], 5) == 5.0
    assert quorum_lease([5.0, None], 4) == NEVER  # only one valid lease: no quorum
    assert quorum_lease([5.0], 5) == NEVER  # too few peers alive
    assert quorum_lease([5.0, 7.0], 3) == 7.0  # 3 members: one peer suffices
