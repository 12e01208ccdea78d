"""Simulated clusters: leases, suspicion and the takeover hold when members crash or go quiet.

Every test runs in :mod:`tests.sim.netsim` (fake clock, seeded network) and checks the
safety invariant after every delivered datagram, tick and kernel update: no bucket is
served by two up nodes (crashed nodes serve nothing).  The witnesses tests allow the
documented exception (two nodes that each believe the other dead).

Owns: a crash stops no survivor (issue 11: a suspect member's lease needs no release), the
same without the suspect exemption (the mutation check) and with a takeover hold instead,
the brief's worked example (D then C fail), a peer still heard that stops acking stops us by
the lease, and witnesses ending the exemption of a peer that is alive.
"""

from __future__ import annotations

import pytest

from multihost.membership import leasebook, leases
from tests.sim.netsim import Kernel, NetParams, NetSim, SimNode, settle
from tests.sim.netsim_config import DEAD_AFTER, DELAY_MAX, EMPTY, INTERVAL, SETTLE, make_configs
from tests.sim.netsim_outage import OutageWatch

# ------------------------------------------------------------ lease cost, hold


@pytest.mark.parametrize("quorum", [False, True], ids=["no-quorum", "quorum"])
@pytest.mark.parametrize("n", [3, 5])
@pytest.mark.parametrize("phase", [0.0, 0.37, 0.83])
def test_crash_stops_no_survivor(quorum: bool, n: int, phase: float) -> None:
    """A crashed member's lease lapses before it is declared dead; being suspect (silent
    for interval + jitter, its last heartbeat acking us) it needs to give none, so no
    survivor stops serving its own buckets, not even for the apply time (issue 11)."""
    sim = NetSim(make_configs(n, quorum=quorum), seed=41 + n)
    settle(sim)
    sim.run_for(phase)
    watch = OutageWatch(sim)
    sim.crash("n2")
    watch.crashed()
    settle(sim)
    watch.check(0.0)
    lapsed = [log for x in sim.nodes.values() for _, log in x.logs if log.event == "lease-lapsed"]
    assert not lapsed
    suspected = {
        x.name for x in sim.nodes.values() for _, log in x.logs if log.event == "peer-suspect"
    }
    assert suspected == {f"n{i}" for i in range(n)} - {"n2"}


def test_without_suspicion_a_crash_stops_survivors(monkeypatch: pytest.MonkeyPatch) -> None:
    """The control (a mutation the test above catches): without the suspect exemption, the
    old rule, survivors stop for up to one interval plus two delays plus the margin."""
    monkeypatch.setattr(leasebook, "exempt", lambda *a, **k: False)
    sim = NetSim(make_configs(5), seed=41)
    settle(sim)
    watch = OutageWatch(sim)
    sim.crash("n2")
    watch.crashed()
    settle(sim)
    assert 0.0 < watch.worst() <= INTERVAL + 2 * DELAY_MAX + 0.1 + 0.05


def test_takeover_hold_removes_the_crash_release_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """Even without the suspect exemption, a hold above one interval plus two delays
    plus the margin leaves the crashed member's lease valid until it is declared dead."""
    hold = INTERVAL + 2 * DELAY_MAX + 0.3
    monkeypatch.setattr(leasebook, "exempt", lambda *a, **k: False)
    sim = NetSim(make_configs(5, hold=hold), seed=41)
    settle(sim, bound=SETTLE + hold)
    watch = OutageWatch(sim)
    sim.crash("n2")
    watch.crashed()
    crashed_at = sim.now
    settle(sim, bound=SETTLE + hold)
    watch.check(0.0)
    assert sim.now - crashed_at <= DEAD_AFTER + hold + INTERVAL + DELAY_MAX


def test_brief_example_d_then_c_leaves_a_and_b_half_each() -> None:
    """The brief's worked example: D fails, then C; A and B serve half each, and neither
    survivor ever stops serving what it had."""
    sim = NetSim(make_configs(4), seed=44)
    settle(sim)
    watch = OutageWatch(sim)
    for name in ("n3", "n2"):
        sim.crash(name)
        watch.crashed()
        settle(sim)
    watch.check(0.0)
    assert sim.nodes["n0"].serves("all") == sim.nodes["n1"].serves("all") == 20160


def test_heard_peer_that_stops_acking_stops_us_at_once() -> None:
    """The asymmetric case the lease exists for: n1 stops hearing n0 but n0 still hears n1.
    n1 is never suspect, so n0 must stop by its lease, before n1 may take over."""
    params = NetParams(delay_min=0.001, delay_max=0.002)
    sim = NetSim(make_configs(3), seed=45, params=params)
    settle(sim)
    sim.link("n0", "n1", up=False)
    cut = sim.now
    stopped: list[float] = []

    def observe(node: SimNode, old: Kernel, new: Kernel, now: float) -> None:
        if node.name == "n0" and not new.masks.get("all", EMPTY).any() and not stopped:
            stopped.append(now)

    sim.observers.append(observe)
    sim.run_for(3 * DEAD_AFTER)
    assert "n1" not in sim.core("n0").suspects
    assert stopped and stopped[0] - cut <= DEAD_AFTER  # stopped by the lapsed lease
    assert sim.nodes["n0"].serves("all") == 0 and sim.exactly_once()


def _overlap_while_heard(sim: NetSim, a: str, b: str) -> list[float]:
    """Times at which ``a`` and ``b`` served a bucket together while one of them had not yet
    declared the other dead (what the suspect rule alone allows under bidirectional
    loss: one side took over, the other still exempted it as suspect)."""
    seen: list[float] = []

    def observe(node: SimNode, old: Kernel, new: Kernel, now: float) -> None:
        x, y = sim.nodes[a], sim.nodes[b]
        if not (x.up and y.up) or node.name not in (a, b):
            return
        if b not in sim.core(a).view and a not in sim.core(b).view:
            return  # mutual: both declared the other dead
        both = x.kernel.masks.get("all", EMPTY) & y.kernel.masks.get("all", EMPTY)
        if both.any():
            seen.append(now)

    sim.observers.append(observe)
    return seen


@pytest.mark.parametrize(
    ("witnesses", "seed", "phase"),
    [(True, 46, 0.3), (True, 47, 0.55), (True, 48, 0.8), (True, 49, 0.05), (False, 47, 0.3)],
)
def test_witnesses_end_the_exemption_of_a_peer_that_is_alive(
    witnesses: bool, seed: int, phase: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """n0 and n1 lose each other both ways; n2 hears both.  n1's silence towards n0 is not
    a crash: n2's heartbeats ack n1's newer seqs, so n0 must not exempt n1 (and the other
    way round): nothing is served twice before both have declared the other dead."""
    if not witnesses:
        original = leases.exempt
        monkeypatch.setattr(
            leasebook, "exempt", lambda *a, **k: original(*a, **{**k, "witnesses": ()})
        )
    sim = NetSim(make_configs(3), seed=seed, allow_mutual_suspicion=True)
    settle(sim)
    seen = _overlap_while_heard(sim, "n0", "n1")
    sim.run_for(phase)
    sim.link("n0", "n1", up=False)
    sim.link("n1", "n0", up=False)
    sim.run_for(DEAD_AFTER + INTERVAL)
    if witnesses:
        assert not seen
    else:
        assert seen  # the control: the exemption alone serves twice before either death
