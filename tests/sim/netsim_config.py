"""Configurations and timing of simulated clusters (test harness, with tests/sim/netsim.py).

Owns: the cluster key, the membership configs of nodes ``n0..n{n-1}`` (:func:`make_configs`),
the timing those configs and the network's defaults give (interval, dead-after, the largest
delay, and the time to settle after a single event) for bounds in tests, and the table of
clusters with at most 8 slots (buckets, the empty mask, a slot's share).

Must not: sleep, read real time, open sockets.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from multihost.assignment import default_table
from multihost.membership.config import MembershipConfig
from multihost.membership.ownership import BoolArray, empty
from multihost.membership.ownership import share_mask as table_share_mask

KEY = b"sim-cluster-key-0123456789abcdef"
# The table of clusters with at most 8 slots (factorial-8), for tests of such clusters;
# NetSim itself uses its configs' table (``sim.table``, ``sim.buckets``, ``sim.empty``).
BUCKETS = default_table().buckets
EMPTY = empty(BUCKETS)


def share_mask(live: frozenset[int], slot: int) -> BoolArray:
    """``slot``'s share under ``live`` in the table of clusters of at most 8 slots."""
    return table_share_mask(default_table(), live, slot)


# Timing of make_configs() and NetParams() defaults, for bounds in tests.
INTERVAL = 1.0
DEAD_AFTER = 4.0
DELAY_MAX = 0.1
# After any single event: detection, one heartbeat each way, the release/take handshake.
SETTLE = DEAD_AFTER + 4 * (INTERVAL + DELAY_MAX)


def make_configs(
    n: int,
    *,
    groups: Mapping[str, Iterable[int]] | None = None,
    interval: float = INTERVAL,
    dead_after: float = DEAD_AFTER,
    hold: float = 0.0,
    margin: float = 0.1,
    jitter: float = DELAY_MAX,
    quorum: bool = False,
    cluster: str = "sim",
    key: bytes = KEY,
    digest: bytes = b"cfg-1",
) -> dict[str, MembershipConfig]:
    """Configs of nodes ``n0..n{n-1}`` (slot = index); ``groups`` name member indexes."""
    names = [f"n{i}" for i in range(n)]
    members = {name: i for i, name in enumerate(names)}
    spec = groups if groups is not None else {"all": range(n)}
    gmap = {g: frozenset(names[i] for i in idx) for g, idx in spec.items()}
    return {
        name: MembershipConfig(
            cluster=cluster,
            node=name,
            members=members,
            groups=gmap,
            key=key,
            interval=interval,
            dead_after=dead_after,
            config_digest=digest,
            quorum=quorum,
            takeover_hold=hold,
            lease_margin=margin,
            jitter=jitter,
        )
        for name in names
    }
