"""Clusters beyond 8 slots and weighted members through simulated membership cores.

Heartbeat version 2 carries 16-bit slot masks: clusters of 9..16 nodes converge to exact
shares of their min-wise table (``lcm(1..n)`` buckets), a crash moves only the crashed
node's buckets, a restart moves exactly those back, and weighted nodes serve shares in
proportion to their weights.  Version-1 heartbeats are refused with a reason and one log
line.  The safety invariant is checked after every step (:mod:`tests.sim.netsim`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from multihost.membership.config import MembershipConfig
from multihost.membership.effects import Log, Rejected
from multihost.membership.protocol import MembershipCore
from multihost.membership.wire import Heartbeat
from multihost.minwise import lcm_upto
from multihost.tablechoice import table_for, weighted_table
from tests.sim.netsim import NetSim, settle
from tests.sim.netsim_config import INTERVAL, KEY, make_configs
from tests.wire_v1 import encode_v1


def _masks(sim: NetSim) -> dict[str, np.ndarray]:
    return {n: x.kernel.masks["all"].copy() for n, x in sim.nodes.items() if x.up}


@pytest.mark.parametrize("n", [9, 12, 16])
def test_big_clusters_share_exactly_and_a_crash_moves_only_its_share(n: int) -> None:
    configs = make_configs(n)
    assert configs["n0"].ownership_table is table_for(n)
    sim = NetSim(configs, seed=n)
    settle(sim)
    buckets = lcm_upto(n)
    assert sim.buckets == buckets
    assert [sim.nodes[f"n{i}"].serves("all") for i in range(n)] == [buckets // n] * n
    before = _masks(sim)
    victim = f"n{n - 1}"
    sim.crash(victim)
    settle(sim)
    after = _masks(sim)
    for name, mask in after.items():
        assert sim.nodes[name].serves("all") == buckets // (n - 1)
        assert not np.any(before[name] & ~mask), f"{name} lost buckets it owned"
        gained = mask & ~before[name]
        assert not np.any(gained & ~before[victim]), f"{name} took a survivor's bucket"
    sim.start(victim)
    settle(sim)
    for name, mask in _masks(sim).items():
        assert np.array_equal(mask, before[name]), f"{name}: recovery is not the inverse"


def _weighted_configs(weights: list[int]) -> dict[str, MembershipConfig]:
    table = weighted_table(tuple(enumerate(weights)))
    return {
        name: dataclasses.replace(c, table=table) for name, c in make_configs(len(weights)).items()
    }


@pytest.mark.parametrize("weights", [[2, 1, 1], [3, 1, 2, 1, 1], [4, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1]])
def test_weighted_members_serve_in_proportion_and_a_crash_moves_only_its_share(
    weights: list[int],
) -> None:
    sim = NetSim(_weighted_configs(weights), seed=len(weights))
    settle(sim)
    total = sum(weights)
    b = sim.buckets
    assert [sim.nodes[f"n{i}"].serves("all") for i in range(len(weights))] == [
        b * w // total for w in weights
    ]
    before = _masks(sim)
    sim.crash("n0")  # the heaviest member: all its virtual slots fail together
    settle(sim)
    rest = total - weights[0]
    for i, w in enumerate(weights[1:], start=1):
        name = f"n{i}"
        assert sim.nodes[name].serves("all") == b * w // rest
        assert not np.any(before[name] & ~sim.nodes[name].kernel.masks["all"])


def test_version_one_heartbeats_are_refused_with_one_log_line() -> None:
    cfg = make_configs(3)["n0"]
    core = MembershipCore(cfg, b"\1" * 8, 0.0)
    old = Heartbeat(cluster="sim", sender="n1", slot=1, boot=b"\2" * 8, seq=1, digest=b"")
    effects = core.receive(encode_v1(old, KEY), 0.1)
    effects += core.receive(encode_v1(dataclasses.replace(old, seq=2), KEY), 0.1 + INTERVAL)
    rejected = [e for e in effects if isinstance(e, Rejected)]
    assert [(e.reason, e.sender) for e in rejected] == [("old-version", "n1")] * 2
    logs = [e for e in effects if isinstance(e, Log) and e.event == "old-wire-version"]
    assert len(logs) == 1 and logs[0].level == "error"
    assert logs[0].fields["sender"] == "n1" and "version 2" in str(logs[0].fields["detail"])
    assert core.members()["n1"].state == "unknown"  # never a member
    assert core.counters().rejected["old-version"] == 2


def test_nodes_with_different_tables_refuse_each_other_with_a_hint() -> None:
    """A mix of tables (here: n2 configured with weights the others lack) is a digest
    mismatch: never a member, one error line naming what to compare."""
    configs = make_configs(3)
    configs["n2"] = dataclasses.replace(
        configs["n2"], table=weighted_table(((0, 1), (1, 1), (2, 2)))
    )
    assert configs["n2"].wire_digest != configs["n0"].wire_digest
    # without quorum the odd one out serves alone (documented, as for any digest mismatch)
    sim = NetSim(configs, seed=5, allow_mutual_suspicion=True)
    sim.run_for(20 * INTERVAL)
    assert sim.core("n0").members()["n2"].state == "mismatch"
    assert sim.core("n2").members()["n0"].state == "mismatch"
    logs = [e for _, e in sim.nodes["n0"].logs if e.event == "config-digest-mismatch"]
    assert len(logs) == 1 and "check-config" in str(logs[0].fields["hint"])
    assert sim.nodes["n0"].serves("all") + sim.nodes["n1"].serves("all") == sim.buckets
