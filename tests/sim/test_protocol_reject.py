"""Simulated clusters: rejected datagrams, configuration mismatch, member states and status.

Every test runs in :mod:`tests.sim.netsim` (fake clock, seeded network) and checks the
safety invariant after every delivered datagram, tick and kernel update: no bucket is
served by two up nodes (crashed nodes serve nothing).  The configuration-mismatch test
without quorum allows the documented exception (two nodes that each believe the other dead).

Owns: every rejection reason for a datagram injected into a settled cluster (spoofed key,
replays, other cluster, unknown sender or slot, truncated and oversize), config digest
mismatch with and without quorum, the member-state transition table, a bad boot id, and
the status a core reports about its peers.
"""

from __future__ import annotations

import dataclasses

import pytest

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
from tests.sim.netsim import NetSim, settle
from tests.sim.netsim_config import DELAY_MAX, INTERVAL, KEY, make_configs

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
