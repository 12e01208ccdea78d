"""Pauses of the agent's process or VM (docs/membership.md, "Pauses"): a core called later
than the deadline it handed out could not run meanwhile, and its peers' silence in that
time counts neither towards their suspicion nor their death.

The case that made it necessary: on a 2-vCPU VM whose host stops it for ~100-120 ms at a
time under load (``stress-ng`` on every core), every agent of a lab at 20 ms heartbeats
(dead after 70 ms) declared its peers dead when the VM resumed, though nobody had failed.
"""

from __future__ import annotations

import pytest

from multihost.membership import leases
from multihost.membership.state import PeerRecord
from tests.sim.netsim import NetSim, settle
from tests.sim.netsim_config import DEAD_AFTER, DELAY_MAX, INTERVAL, make_configs


def _events(sim: NetSim, event: str, since: float = 0.0) -> list[tuple[str, float]]:
    return [
        (n.name, t)
        for n in sim.nodes.values()
        for t, log in n.logs
        if log.event == event and t >= since
    ]


@pytest.mark.parametrize("quorum", [False, True], ids=["no-quorum", "quorum"])
@pytest.mark.parametrize("seconds", [DEAD_AFTER / 2, 2 * DEAD_AFTER, 10 * DEAD_AFTER])
def test_a_frozen_cluster_declares_nobody_dead(quorum: bool, seconds: float) -> None:
    """Every node stops (their VM or host) for ``seconds``, longer than dead_after or not:
    on resuming nobody is declared dead, no view changes, and every bucket is served
    once again at the end (safety is checked after every step by the simulator)."""
    sim = NetSim(make_configs(4, quorum=quorum), seed=7)
    settle(sim)
    t0 = sim.now
    views = {n: len(x.views) for n, x in sim.nodes.items()}
    sim.pause(sim.nodes, seconds)
    sim.run_for(seconds + 3 * DEAD_AFTER)
    assert _events(sim, "member-dead", t0) == []
    assert {n: len(x.views) for n, x in sim.nodes.items()} == views
    assert {n for n, _ in _events(sim, "paused", t0)} == set(sim.nodes)
    assert sim.exactly_once()


def test_without_the_excuse_a_frozen_cluster_fails_over(monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: without :func:`leases.paused`, the same freeze makes every node declare
    every peer dead (what the lab measured before this rule) and, each believing the
    others dead, serve their buckets too: mutual suspicion, allowed here so the run goes on
    (the strict check of the test above would stop it as double service)."""
    monkeypatch.setattr("multihost.membership.protocol.paused", lambda *a: [])
    sim = NetSim(make_configs(4), seed=7, allow_mutual_suspicion=True)
    settle(sim)
    t0 = sim.now
    sim.pause(sim.nodes, 2 * DEAD_AFTER)
    sim.run_for(2 * DEAD_AFTER + INTERVAL)
    assert len(_events(sim, "member-dead", t0)) == 4 * 3


def test_a_crash_during_our_pause_is_still_detected() -> None:
    """A peer that really crashed while this node was stopped is declared dead once this
    node has observed its silence for dead_after: the pause only delays that by its
    length.  n0 is paused for one dead_after, n2 crashes at the start of the pause."""
    sim = NetSim(make_configs(3), seed=3)
    settle(sim)
    t0 = sim.now
    sim.crash("n2")
    sim.pause(["n0"], DEAD_AFTER)
    settle(sim, bound=4 * DEAD_AFTER)
    dead = {(n, t) for n, t in _events(sim, "member-dead", t0)}
    by_n0 = [t for n, t in dead if n == "n0"]
    by_n1 = [t for n, t in dead if n == "n1"]
    assert len(by_n0) == len(by_n1) == 1
    # n1 was not paused: dead_after after n2's last heartbeat.  n0 excused its pause, less
    # the lateness bound (jitter) that any call may have anyway.
    assert by_n1[0] <= t0 + DEAD_AFTER + DELAY_MAX  # its last heartbeat may be in flight
    jitter = sim.nodes["n0"].config.jitter
    assert by_n1[0] + DEAD_AFTER - jitter - 1e-9 <= by_n0[0] <= by_n1[0] + DEAD_AFTER + INTERVAL


def test_a_call_on_time_excuses_nothing() -> None:
    """Normal operation (every input at or before the deadline, or later by at most the
    lateness bound): no pause is ever logged."""
    sim = NetSim(make_configs(3), seed=5)
    settle(sim)
    sim.crash("n1")
    settle(sim)
    sim.restart("n1")
    settle(sim)
    assert _events(sim, "paused") == []


@pytest.mark.parametrize(
    ("silent_from", "start", "end", "after"),
    [
        (1.0, 2.0, 5.0, 4.0),  # silent before the pause: its whole length is excused
        (3.0, 2.0, 5.0, 5.0),  # heard during the pause: silence counts from its end
        (6.0, 2.0, 5.0, 6.0),  # heard after it: nothing to excuse
        (None, 2.0, 5.0, None),  # never heard: nothing to count
    ],
)
def test_excuse_arithmetic(
    silent_from: float | None, start: float, end: float, after: float | None
) -> None:
    p = PeerRecord("b", 1)
    p.silent_from = p.last_heard = silent_from
    p.excuse(start, end)
    assert p.silent_from == after
    assert p.last_heard == silent_from  # the receipt time itself is not rewritten


def test_paused_needs_lateness_beyond_the_bound() -> None:
    p = PeerRecord("b", 1)
    p.silent_from = 0.0
    assert leases.paused([p], 1.0, 1.05, 0.05) == []
    assert p.silent_from == 0.0
    (log,) = leases.paused([p], 1.0, 1.5, 0.05)
    assert (log.event, log.fields["ms"]) == ("paused", 500.0)
    assert p.silent_from == pytest.approx(0.45)
    assert leases.paused([p], None, 9.0, 0.05) == []  # no deadline handed out: no claim
