"""Simulated clusters of membership cores, scripted: convergence, failover, rejection, safety.

Every test runs in :mod:`tests.sim.netsim` (fake clock, seeded network) and checks the
safety invariant after every delivered datagram, tick and kernel update: no bucket is
served by two up nodes (crashed nodes serve nothing).  Only the no-quorum partition tests
allow the documented exception (two nodes that each believe the other dead).  Random
fault schedules are in ``test_protocol_random.py``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import pytest

from multihost.membership import leasebook, leases
from multihost.membership.effects import ClaimsChanged, Rejected, ViewChanged
from multihost.membership.state import (
    TRANSITIONS,
    IllegalTransitionError,
    MemberEvent,
    MemberState,
    PeerRecord,
    next_state,
)
from multihost.membership.wire import Ack, Heartbeat, decode, encode
from tests.sim.netsim import (
    DEAD_AFTER,
    DELAY_MAX,
    EMPTY,
    INTERVAL,
    KEY,
    SETTLE,
    Kernel,
    NetParams,
    NetSim,
    OutageWatch,
    SafetyViolationError,
    SimNode,
    make_configs,
    settle,
)

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


# ------------------------------------------------------------------ rejection


def _heartbeat(sim: NetSim, **changes: object) -> Heartbeat:
    """A decoded copy of n1's latest heartbeat, with ``changes``."""
    payload = next(p for _, src, p in reversed(sim.captured) if src == "n1")
    return dataclasses.replace(decode(payload, KEY), **changes)  # type: ignore[arg-type]


def _assert_rejected(sim: NetSim, payload: bytes, reason: str) -> None:
    core = sim.core("n0")
    view, before = core.view, core.counters().rejected[reason]
    effects = sim.inject("n0", payload)
    assert [e.reason for e in effects if isinstance(e, Rejected)] == [reason]
    assert not any(isinstance(e, ViewChanged | ClaimsChanged) for e in effects)
    assert core.view == view and core.counters().rejected[reason] == before + 1


@pytest.fixture
def settled3() -> NetSim:
    sim = NetSim(make_configs(3), seed=51)
    settle(sim)
    return sim


def test_spoofed_key_is_rejected(settled3: NetSim) -> None:
    hb = _heartbeat(settled3, seq=10**6, view=0, acks={})
    _assert_rejected(settled3, encode(hb, b"not-the-cluster-key!"), "bad-mac")


def test_replayed_captured_heartbeat_is_rejected(settled3: NetSim) -> None:
    settled3.run_for(2 * INTERVAL)
    delivered = settled3.now - 2 * DELAY_MAX  # sent before this: surely delivered by now
    sent = [p for t, src, p in settled3.captured if src == "n1" and t < delivered]
    _assert_rejected(settled3, sent[-1], "replay")  # the latest one
    _assert_rejected(settled3, sent[0], "replay")  # the first one


def test_replayed_heartbeat_of_a_previous_incarnation_is_rejected(settled3: NetSim) -> None:
    old = next(p for _, src, p in reversed(settled3.captured) if src == "n1")
    settled3.crash("n1")
    settled3.restart("n1")
    settle(settled3)
    _assert_rejected(settled3, old, "replay")


def test_other_cluster_is_rejected(settled3: NetSim) -> None:
    hb = _heartbeat(settled3, cluster="elsewhere", seq=10**6)
    _assert_rejected(settled3, encode(hb, KEY), "other-cluster")


@pytest.mark.parametrize("change", [{"sender": "stranger"}, {"slot": 5}, {"slot": 2}])
def test_unknown_sender_or_slot_mismatch_is_rejected(
    settled3: NetSim, change: dict[str, object]
) -> None:
    hb = _heartbeat(settled3, seq=10**6, **change)
    _assert_rejected(settled3, encode(hb, KEY), "unknown-sender")


def test_truncated_and_oversize_datagrams_are_rejected(settled3: NetSim) -> None:
    payload = encode(_heartbeat(settled3, seq=10**6), KEY)
    _assert_rejected(settled3, payload[:40], "truncated")
    _assert_rejected(settled3, payload + bytes(2000), "oversize")


def test_digest_mismatch_is_logged_once_and_not_a_member() -> None:
    """Without quorum, nodes that disagree on the configuration are partitioned from each
    other: the odd one out serves the group alone (documented; logged loudly)."""
    configs = make_configs(3)
    configs["n2"] = make_configs(3, digest=b"cfg-2")["n2"]
    sim = NetSim(configs, seed=52, allow_mutual_suspicion=True)
    sim.run_for(20.0)
    core = sim.core("n0")
    assert core.view == {"n0", "n1"}
    assert core.members()["n2"].state == "mismatch"
    assert core.counters().rejected["digest-mismatch"] >= 15
    logs = [log for _, log in sim.nodes["n0"].logs if log.event == "config-digest-mismatch"]
    assert len(logs) == 1 and logs[0].level == "error"
    assert not any("n2" in view for _, view in sim.nodes["n0"].views)
    assert sim.nodes["n0"].serves("all") + sim.nodes["n1"].serves("all") == 40320


def test_digest_mismatch_with_quorum_is_strictly_safe() -> None:
    configs = make_configs(3, quorum=True)
    configs["n2"] = make_configs(3, quorum=True, digest=b"cfg-2")["n2"]
    sim = NetSim(configs, seed=54)
    sim.run_for(20.0)
    assert sim.nodes["n2"].serves("all") == 0 and not sim.core("n2").quorum_ok
    assert sim.nodes["n0"].serves("all") + sim.nodes["n1"].serves("all") == 40320


# ----------------------------------------------------------- transition table


def test_transition_table_is_the_only_way_to_change_member_state() -> None:
    legal = set(TRANSITIONS)
    for state in MemberState:
        for event in MemberEvent:
            if (state, event) in legal:
                assert next_state(state, event) is TRANSITIONS[(state, event)]
            else:
                with pytest.raises(IllegalTransitionError):
                    next_state(state, event)
    peer = PeerRecord("x", 1)
    with pytest.raises(IllegalTransitionError):
        peer.transition(MemberEvent.SILENT)  # unknown members have no timer
    assert peer.transition(MemberEvent.HEARD) == (MemberState.UNKNOWN, MemberState.ALIVE)
    assert peer.transition(MemberEvent.SILENT)[1] is MemberState.DEAD
    with pytest.raises(IllegalTransitionError):
        peer.transition(MemberEvent.SILENT)


def test_core_rejects_a_bad_boot_id() -> None:
    from multihost.membership.protocol import MembershipCore

    with pytest.raises(ValueError, match="boot id"):
        MembershipCore(make_configs(2)["n0"], b"short", 0.0)


def test_status_shows_peer_state() -> None:
    sim = NetSim(make_configs(3), seed=53)
    settle(sim)
    sim.run_for(2 * INTERVAL)
    status = sim.core("n0").members()
    assert set(status) == {"n0", "n1", "n2"}
    peer = status["n1"]
    assert peer.state == "alive" and peer.view == {"n0", "n1", "n2"}
    assert peer.applied_epoch is not None and peer.applied_epoch >= 1
    assert peer.lease_expires is not None and peer.lease_expires > sim.now
    counters = sim.core("n0").counters()
    assert counters.sent > 0 and counters.accepted > 0 and counters.received >= counters.accepted
    assert isinstance(Ack(b"\0" * 8, 1), Ack)


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
