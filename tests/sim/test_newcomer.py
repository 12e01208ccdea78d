"""Newcomers (simulated): a member that starts or restarts disturbs nobody else.

A core heard from its first heartbeat (seq 1 of an incarnation) cannot take anything of
ours before its start-up grace ends, so the others need neither its lease nor to be in its
view until then (docs/membership.md, "Newcomers").  Before this rule every join or restart
suspended every other member and blocked their leases: all of them released everything
for a moment, the newcomer grabbed the whole space and then had to hand it back through
the drain (the lab saw ~2 s of dropped new UDP flows after ``lab up``).

Every test also runs the simulator's strict safety check after every step.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest

from multihost.membership.config import MembershipConfig
from multihost.membership.ownership import BoolArray
from multihost.membership.protocol import DEATH_ANNOUNCEMENTS
from tests.sim.netsim import Kernel, NetParams, NetSim, SimNode, settle
from tests.sim.netsim_config import BUCKETS, DEAD_AFTER, EMPTY, SETTLE, make_configs, share_mask

# Agent-like timing (seconds): 100 ms heartbeats, the default dead_after, a LAN's delays.
DEAD = 0.23


def fast(n: int) -> dict[str, MembershipConfig]:
    return make_configs(n, interval=0.1, dead_after=DEAD, margin=0.01, jitter=0.005)


LAN = NetParams(delay_min=0.0002, delay_max=0.002, apply_lag_max=0.005)


class Watch:
    """Per node: the most buckets it ever served, and the buckets in ``keep`` (by node)
    that it stopped serving at some point."""

    def __init__(self, sim: NetSim) -> None:
        self.most: dict[str, int] = {}
        self.keep: dict[str, BoolArray] = {}
        self.lost: dict[str, int] = {}
        sim.observers.append(self._observe)

    def _observe(self, node: SimNode, old: Kernel, new: Kernel, now: float) -> None:
        served = new.masks.get("all", EMPTY)
        self.most[node.name] = max(self.most.get(node.name, 0), int(served.sum()))
        keep = self.keep.get(node.name)
        if keep is not None and node.up:
            gone = int((keep & ~served).sum())
            self.lost[node.name] = max(self.lost.get(node.name, 0), gone)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("stagger", [0.0, 0.005, 0.03])
def test_nodes_starting_together_never_claim_beyond_their_share(seed: int, stagger: float) -> None:
    n = 4
    sim = NetSim(fast(n), seed=seed, params=LAN, start=False)
    watch = Watch(sim)
    for i in range(n):
        sim.at(i * stagger, functools.partial(sim.start, f"n{i}"))
    sim.run_for(0.001 + n * stagger)
    settle(sim, bound=1.0)
    assert max(watch.most.values()) == BUCKETS // n, watch.most


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("how", ["restart", "join"])
def test_a_join_or_restart_moves_only_the_newcomers_share(seed: int, how: str) -> None:
    n = 4
    sim = NetSim(fast(n), seed=seed, params=LAN)
    settle(sim, bound=1.0)
    if how == "join":  # down for long enough to be declared dead: a join of a new member
        sim.crash("n3")
        settle(sim, bound=1.0)
    sim.run_for(sim.rng.uniform(0.0, 0.1))
    watch = Watch(sim)
    live = frozenset(range(n))
    for i in range(n - 1):  # what each survivor keeps once n3 is back
        watch.keep[f"n{i}"] = sim.nodes[f"n{i}"].kernel.masks["all"] & share_mask(live, i)
    sim.restart("n3")
    settle(sim, bound=1.0)
    assert not any(watch.lost.values()), watch.lost
    assert watch.most["n3"] == BUCKETS // n


def test_a_newcomer_that_cannot_hear_us_stops_us_by_the_end_of_its_grace() -> None:
    """n3 restarts but never hears n0 (one-way loss n0 -> n3): once its grace ends it
    serves without n0, so n0 must have stopped by then -- the strict safety check after
    every step is the assertion; n0 stops, and n3 never counts n0 as alive."""
    sim = NetSim(fast(4), seed=3, params=LAN)
    settle(sim, bound=1.0)
    sim.link("n0", "n3", up=False)
    sim.restart("n3")
    restarted = sim.now
    sim.run_for(2 * DEAD)
    assert "n0" not in sim.core("n3").view
    assert not sim.nodes["n0"].kernel.masks.get("all", EMPTY).any()  # suspended by n3
    assert sim.nodes["n3"].kernel.masks["all"].any()  # n3 serves after its grace
    grace_end = restarted + DEAD
    assert sim.now > grace_end


def test_a_newcomer_whose_first_heartbeat_was_lost_gets_no_newcomer_lease() -> None:
    """Only seq 1 bounds the newcomer's start: without it the old rule holds (the join
    blocks until the newcomer acks) -- safe, only slower."""
    sim = NetSim(make_configs(3, interval=1.0, dead_after=DEAD_AFTER), seed=5)
    settle(sim, bound=SETTLE)
    sim.link("n2", "n0", up=False)
    sim.restart("n2")
    sim.run_for(0.01)  # seq 1 sent (and lost towards n0)
    sim.link("n2", "n0", up=True)
    sim.run_for(1.5)  # seq 2 reaches n0
    peer = sim.core("n0")._peers["n2"]
    assert peer.seq >= 2 and peer.newcomer_until is None
    assert sim.core("n1")._peers["n2"].newcomer_until is not None
    settle(sim, bound=SETTLE)
    assert all(
        np.array_equal(sim.nodes[f"n{i}"].kernel.masks["all"], share_mask(frozenset(range(3)), i))
        for i in range(3)
    )


def test_a_death_is_announced_repeatedly_min_send_gap_apart() -> None:
    """The heartbeat with the new view goes out at the death and is repeated
    ``DEATH_ANNOUNCEMENTS`` times, so a peer that still exempts us as suspect sees it
    despite several lost datagrams."""
    sim = NetSim(fast(3), seed=1, params=LAN)
    settle(sim, bound=1.0)
    core = sim.core("n0")
    gap = core.config.min_send_gap
    sends = 1 + DEATH_ANNOUNCEMENTS
    sim.crash("n2")
    sim.run_for(1.0, stop=lambda: "n2" not in core.view)
    dead_at = sim.now
    sim.run_for(DEATH_ANNOUNCEMENTS * gap + 0.001)
    mine = [t for t, src, _ in sim.captured if src == "n0" and t >= dead_at]
    assert len(mine) == sends, (mine, dead_at)
    assert mine[0] == dead_at
    assert all(b - a >= gap - 1e-9 for a, b in itertools.pairwise(mine))
    assert mine[-1] < dead_at + core.config.interval  # all before the next regular one
    sim.run_for(core.config.interval - DEATH_ANNOUNCEMENTS * gap - 0.002)
    assert len([t for t, src, _ in sim.captured if src == "n0" and t >= dead_at]) == sends


def test_a_newcomer_that_heard_us_ineligible_needs_our_fresh_ack() -> None:
    """Found by the random search (8 nodes starting under 30 % loss): a newcomer that hears
    us take no share (draining, or suspended) takes it without declaring us dead, so its
    newcomer lease says nothing about it.  Here n1 drains; n2 restarts, n1 hears only its
    seq 1 (then n2 -> n1 is cut) while n2 takes part of n1's share.  n1 undrains just as
    n1 -> n2 fails too: n2 never learns it and keeps that part.  n1 must wait for n2's ack
    of a fresh heartbeat instead of claiming against n2's seq 1: the strict safety check
    after every step stops the old rule as double service."""
    sim = NetSim(make_configs(3, interval=1.0, dead_after=DEAD_AFTER), seed=11)
    settle(sim, bound=SETTLE)
    sim.set_draining("n1", True)
    sim.run_for(2.0)
    sim.restart("n2")
    heard = sim.core("n1")._peers["n2"]
    assert sim.run_for(1.0, stop=lambda: heard.boot == sim.core("n2").boot_id)
    assert heard.seq == 1
    sim.link("n2", "n1", up=False)  # n1 hears nothing of n2 after its seq 1
    assert sim.run_for(2.0, stop=lambda: sim.nodes["n2"].serves("all") > BUCKETS // 3)
    assert heard.newcomer_until is None  # void: it may have heard us draining
    sim.link("n1", "n2", up=False)
    sim.set_draining("n1", False)
    sim.run_for(DEAD_AFTER / 2)  # n0 acks n1's fresh heartbeat; n2 cannot
    assert not sim.nodes["n1"].kernel.masks.get("all", EMPTY).any()
