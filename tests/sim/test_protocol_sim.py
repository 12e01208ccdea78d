"""Simulated clusters of membership cores, scripted: convergence, failover, partitions, safety.

Every test runs in :mod:`tests.sim.netsim` (fake clock, seeded network) and checks the
safety invariant after every delivered datagram, tick and kernel update: no bucket is
served by two up nodes (crashed nodes serve nothing).  Only the no-quorum partition tests
allow the documented exception (two nodes that each believe the other dead).

Owns: start-up, groups, failover bounds, restarts, joins (also with slow agents), drain,
convergence after each event, a lossy network, one-way loss and a deaf node, partitions with
and without quorum, and a slow agent against the lease margin.  Leases and suspicion after
crashes are in ``test_protocol_leases.py``; rejected datagrams, the member-state transitions
and status in ``test_protocol_reject.py``; random fault schedules in
``test_protocol_random.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest

from tests.sim.netsim import NetParams, NetSim, SafetyViolationError, settle
from tests.sim.netsim_config import DEAD_AFTER, DELAY_MAX, INTERVAL, SETTLE, make_configs

# --------------------------------------------------------------------- basics


@pytest.mark.parametrize("n", range(2, 9))
def test_startup_converges_and_partitions_the_space(n: int) -> None:
    sim = NetSim(make_configs(n), seed=n)
    took = settle(sim, bound=3 * INTERVAL)
    counts = [sim.nodes[f"n{i}"].serves("all") for i in range(n)]
    assert sum(counts) == 40320 and max(counts) - min(counts) == 0
    assert took <= 2 * INTERVAL + 4 * DELAY_MAX


def test_groups_are_assigned_over_their_own_members() -> None:
    groups = {"all": range(5), "web": [0, 2, 4], "db": [1, 3], "solo": [3]}
    sim = NetSim(make_configs(5, groups=groups), seed=7)
    settle(sim)
    assert sim.nodes["n3"].serves("solo") == 40320
    assert [sim.nodes[f"n{i}"].serves("web") for i in (0, 2, 4)] == [13440] * 3
    assert "web" not in sim.nodes["n1"].kernel.masks


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_failover_within_dead_after_plus_interval_plus_delay(n: int) -> None:
    sim = NetSim(make_configs(n), seed=100 + n)
    settle(sim)
    sim.run_for(0.37)
    sim.crash("n1")
    crashed_at = sim.now
    settle(sim)
    assert sim.now - crashed_at <= DEAD_AFTER + INTERVAL + DELAY_MAX
    assert sim.up_names() == {f"n{i}" for i in range(n)} - {"n1"}


@pytest.mark.parametrize("n", [3, 5, 8])
def test_failover_with_quorum_waits_for_every_peer_to_agree(n: int) -> None:
    sim = NetSim(make_configs(n, quorum=True), seed=200 + n)
    settle(sim)
    sim.run_for(0.61)
    sim.crash("n0")
    crashed_at = sim.now
    settle(sim)
    assert sim.now - crashed_at <= DEAD_AFTER + INTERVAL + 2 * DELAY_MAX


@pytest.mark.parametrize("quick", [False, True], ids=["after-death", "before-detection"])
def test_restarted_node_is_accepted_with_its_new_boot_id(quick: bool) -> None:
    sim = NetSim(make_configs(4), seed=11)
    settle(sim)
    old_boot = sim.core("n2").boot_id
    sim.crash("n2")
    sim.run_for(0.5 if quick else DEAD_AFTER + 2)
    sim.restart("n2")
    settle(sim)
    new_boot = sim.core("n2").boot_id
    assert new_boot != old_boot
    for name in ("n0", "n1", "n3"):
        status = sim.core(name).members()["n2"]
        assert status.state == "alive" and status.boot_id == new_boot.hex()
        events = [log.event for _, log in sim.nodes[name].logs]
        assert "member-restarted" in events
        assert ("member-dead" in events) is not quick
    assert sim.nodes["n2"].serves("all") == 10080


def test_late_joiner_takes_its_share_without_double_claims() -> None:
    sim = NetSim(make_configs(5), seed=3, start=False)
    for i in range(4):
        sim.start(f"n{i}")
    settle(sim)
    sim.run_for(DEAD_AFTER)  # the absent member's grace is long over
    sim.start("n4")
    settle(sim)
    assert [sim.nodes[f"n{i}"].serves("all") for i in range(5)] == [8064] * 5


@pytest.mark.parametrize("seed", range(3))
def test_join_with_slow_agents_waits_for_applied_releases(seed: int) -> None:
    """The members' agents take almost lease_margin to apply; the joiner's is instant.
    It may take its share only once their heartbeats advertise the release as applied."""
    sim = NetSim(make_configs(4), seed=seed, params=NetParams(apply_lag_max=0.0), start=False)
    for name in ("n0", "n1", "n2"):
        sim.start(name)
        sim.apply_lag[name] = (0.08, 0.09)
    settle(sim)
    sim.run_for(DEAD_AFTER)
    sim.start("n3")
    settle(sim)


def test_draining_member_serves_nothing_and_comes_back() -> None:
    sim = NetSim(make_configs(4), seed=5)
    settle(sim)
    sim.set_draining("n0", True)
    settle(sim)
    assert sim.nodes["n0"].serves("all") == 0
    sim.run_for(INTERVAL + DELAY_MAX)
    drained = sim.core("n1").members()["n0"]
    assert drained.draining and not drained.serving  # what "finished draining" can test
    assert not sim.core("n0").members()["n0"].serving
    assert sim.core("n1").view == sim.up_names()  # still a member
    assert [sim.nodes[f"n{i}"].serves("all") for i in (1, 2, 3)] == [13440] * 3
    sim.set_draining("n0", False)
    settle(sim)
    assert sim.nodes["n0"].serves("all") == 10080


@pytest.mark.parametrize("n", [3, 6])
def test_views_converge_within_the_bound_after_each_event(n: int) -> None:
    sim = NetSim(make_configs(n, groups={"all": range(n), "pair": [0, 1]}), seed=60 + n)
    settle(sim)
    events: list[Callable[[], None]] = [
        functools.partial(sim.crash, "n1"),
        functools.partial(sim.restart, "n1"),
        functools.partial(sim.set_draining, "n0", True),
        functools.partial(sim.crash, "n2"),
        functools.partial(sim.set_draining, "n0", False),
        functools.partial(sim.restart, "n2"),
    ]
    for event in events:
        event()
        assert settle(sim) <= SETTLE
    assert sim.nodes["n0"].serves("pair") == sim.nodes["n1"].serves("pair") == 20160


def test_lossy_duplicating_reordering_network_stays_safe_and_converges() -> None:
    params = NetParams(delay_min=0.01, delay_max=0.6, loss=0.2, dup=0.3)
    sim = NetSim(make_configs(6, groups={"all": range(6), "half": range(3)}), params=params)
    sim.run_until(40.0)
    sim.params = NetParams()
    settle(sim)
    assert sum(c[1] == "replay" for n in sim.nodes.values() for c in n.rejected) > 0


# ---------------------------------------------------------------- asymmetric


@pytest.mark.parametrize("hold", [0.0, INTERVAL + 0.5])
def test_one_way_loss_false_suspicion_never_double_claims(hold: float) -> None:
    sim = NetSim(make_configs(3, hold=hold), seed=21)
    settle(sim, bound=SETTLE + hold)
    sim.link("n0", "n1", up=False)  # n1 stops hearing n0; n0 still hears n1
    sim.run_for(3 * DEAD_AFTER)
    assert "n0" not in sim.core("n1").view and "n1" in sim.core("n0").view
    assert sim.nodes["n0"].serves("all") == 0  # no lease from n1: n0 released
    assert sim.exactly_once()  # n1 and n2 took over n0's buckets
    sim.heal()
    settle(sim, bound=SETTLE + hold)


def test_deaf_node_never_double_claims() -> None:
    """A node that hears nobody declares its peers dead one by one and takes over; a
    peer must release even buckets the deaf node inherits only after a *second* death
    (the reason leases cover a node's whole share, not only its direct successor's)."""
    sim = NetSim(make_configs(4), seed=22)
    settle(sim)
    for src in ("n0", "n1", "n2"):
        sim.link(src, "n3", up=False)
    sim.run_for(3 * DEAD_AFTER)
    assert sim.core("n3").view == {"n3"}
    assert sim.nodes["n3"].serves("all") == 40320
    sim.heal()
    settle(sim)


# --------------------------------------------------------- partitions, quorum


def test_partition_with_quorum_minority_serves_nothing() -> None:
    sim = NetSim(make_configs(5, quorum=True), seed=31)
    settle(sim)
    sim.partition(["n0", "n1", "n2"], ["n3", "n4"])
    sim.run_for(2 * SETTLE, stop=sim.exactly_once)
    sim.run_for(SETTLE)
    assert not sim.core("n3").quorum_ok and not sim.core("n4").quorum_ok
    assert sim.nodes["n3"].serves("all") == sim.nodes["n4"].serves("all") == 0
    assert [sim.nodes[f"n{i}"].serves("all") for i in range(3)] == [13440] * 3
    sim.heal()
    settle(sim, bound=SETTLE + DEAD_AFTER)


@pytest.mark.parametrize("seed", range(4))
def test_partition_with_quorum_and_loss_is_strictly_safe(seed: int) -> None:
    sim = NetSim(make_configs(5, quorum=True), seed=seed, params=NetParams(loss=0.15))
    sim.run_for(10.0)
    sim.partition(["n0", "n2", "n4"], ["n1", "n3"])
    sim.run_for(3 * SETTLE)
    sim.heal()
    sim.params = NetParams()
    settle(sim, bound=SETTLE + DEAD_AFTER)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("hold", [0.0, INTERVAL + 0.5])
def test_quorum_counts_leases_not_the_view(seed: int, hold: float) -> None:
    """The minority keeps hearing one majority node a little longer.  Counted by view, that
    node would keep the minority's quorum until it is declared dead, after the majority
    took the minority's buckets; its lease, based on old acks, lapses in time.  (With a
    hold, n3's lease from n0 outlives n0's death, so n3 keeps "pair" until quorum goes.)"""
    groups = {"all": range(5), "pair": [0, 3]}
    sim = NetSim(make_configs(5, quorum=True, groups=groups, hold=hold), seed=seed)
    settle(sim, bound=SETTLE + hold)
    majority, minority = ("n0", "n1", "n2"), ("n3", "n4")
    for a in majority:
        for b in minority:
            sim.link(b, a, up=False)
            if a != "n2":
                sim.link(a, b, up=False)
    sim.run_for(hold + 2.0)  # longer than the majority's takeover takes
    for b in minority:
        sim.link("n2", b, up=False)
    sim.run_for(3 * SETTLE)
    assert sim.nodes["n0"].serves("pair") == 40320 and sim.nodes["n3"].serves("pair") == 0
    sim.heal()
    settle(sim)


@pytest.mark.parametrize("seed", range(4))
def test_lease_margin_covers_a_slow_agent(seed: int) -> None:
    """n0's agent takes almost lease_margin to apply; the network and n1's agent are fast.
    When n1 stops hearing n0 it takes over at the earliest moment the lease allows, so n0
    must give the lease up a margin early."""
    params = NetParams(delay_min=0.001, delay_max=0.002, apply_lag_max=0.0)
    sim = NetSim(make_configs(2), seed=seed, params=params)
    sim.apply_lag["n0"] = (0.09, 0.095)  # lease_margin is 0.1
    settle(sim)
    sim.run_for(seed * 0.25)
    sim.link("n0", "n1", up=False)
    sim.run_for(2 * SETTLE)
    assert sim.nodes["n1"].serves("all") == 40320 and sim.nodes["n0"].serves("all") == 0


def test_partition_without_quorum_both_sides_serve_after_mutual_suspicion() -> None:
    sim = NetSim(make_configs(5), seed=32, allow_mutual_suspicion=True)
    settle(sim)
    sim.partition(["n0", "n1", "n2"], ["n3", "n4"])
    sim.run_for(2 * SETTLE)
    assert sum(sim.nodes[f"n{i}"].serves("all") for i in range(3)) == 40320
    assert sum(sim.nodes[f"n{i}"].serves("all") for i in (3, 4)) == 40320
    sim.heal()
    settle(sim)


def test_partition_without_quorum_is_split_brain_under_the_strict_check() -> None:
    sim = NetSim(make_configs(4), seed=33)
    settle(sim)
    sim.partition(["n0", "n1"], ["n2", "n3"])
    with pytest.raises(SafetyViolationError):
        sim.run_for(2 * SETTLE)


def test_quorum_needs_a_majority_of_configured_members() -> None:
    sim = NetSim(make_configs(4, quorum=True), seed=34, start=False)
    sim.start("n0")
    sim.start("n1")
    sim.run_for(3 * DEAD_AFTER)  # 2 of 4 is not a majority
    assert sim.nodes["n0"].serves("all") == sim.nodes["n1"].serves("all") == 0
    sim.start("n2")
    settle(sim, bound=SETTLE + DEAD_AFTER)
    assert [sim.nodes[f"n{i}"].serves("all") for i in range(3)] == [13440] * 3
