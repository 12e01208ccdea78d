"""The agent's layers call downwards only (agent -> heartbeats -> glue -> core), and the
membership glue is pure (multihost.agent_membership)."""

from __future__ import annotations

import ast
import asyncio
import os
import socket
from pathlib import Path

import pytest

import multihost
from multihost.agent_heartbeats import DRAIN_ROUNDS, HeartbeatLoop
from multihost.agent_membership import (
    INF,
    Actions,
    Confirm,
    Lease,
    MembershipGlue,
    Retarget,
)
from multihost.metrics import Snapshot
from tests.sim.netsim_config import make_configs

SRC = Path(multihost.__file__).parent


def imports(module: str) -> set[str]:
    tree = ast.parse((SRC / f"{module}.py").read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_layers_never_import_the_agent() -> None:
    for layer in ("agent_heartbeats", "agent_kernel", "agent_membership", "linkwatch"):
        assert "multihost.agent" not in imports(layer), layer
    assert "multihost.agent_heartbeats" not in imports("agent_membership")
    assert "multihost.agent_heartbeats" not in imports("agent_kernel")


def test_the_glue_does_no_io() -> None:
    found = imports("agent_membership")
    for mod in ("asyncio", "socket", "time", "os", "threading", "multihost.dataplane.nft"):
        assert mod not in found, mod


def glue(link: list[bool]) -> MembershipGlue:
    cfg = make_configs(2, interval=0.1, dead_after=0.4, margin=0.05, jitter=0.01)["n0"]
    return MembershipGlue(cfg, os.urandom(8), 0.0, names=["n0", "n1"], link_up=lambda: link[0])


def test_alone_the_glue_sends_and_holds_the_kernel_lease_without_expiry() -> None:
    g = glue([True])
    out = g.tick(0.0)
    assert len(out.sends) == 1
    assert Lease(INF) in out.kernel  # no alive peer: nobody could take over
    assert not g.tick(0.01).kernel  # unchanged: nothing to write


def test_link_down_fences_once_and_link_up_rejoins_as_a_new_incarnation() -> None:
    g = glue([True])
    g.tick(0.0)
    down = g.link_down()
    assert g.fenced and g.fences == 1
    assert [op for op in down.kernel if isinstance(op, Retarget) and op.release_all]
    assert not g.link_down().kernel and g.fences == 1  # already fenced
    old = g.core
    up = g.link_up(os.urandom(8), 1.0)
    assert not g.fenced and g.core is not old
    assert up.logs[0].event == "rejoining"


def test_a_fenced_node_sends_no_heartbeat_until_it_rejoins() -> None:
    """Fenced with the link up (IPv6 DAD still running): a heartbeat of the old incarnation
    would tell the peers the node is back, and they would hand it a share it cannot serve."""
    g = glue([True])
    assert g.tick(0.0).sends
    down = g.link_down("IPv6 duplicate address detection running on eth0")
    assert down.logs[0].fields == {"reason": "IPv6 duplicate address detection running on eth0"}
    assert not [s for i in range(1, 20) for s in g.tick(i * 0.1).sends]
    assert g.link_up(os.urandom(8), 2.0).sends  # the new incarnation announces itself


def test_claims_arrive_as_retarget_then_confirm_and_a_dead_link_serves_nothing() -> None:
    link = [True]
    g = glue(link)
    ops = []
    for i in range(30):  # n1 is never heard: after the start-up grace n0 claims its share
        ops += g.tick(i * 0.1).kernel
    retargets = [op for op in ops if isinstance(op, Retarget)]
    confirms = [op for op in ops if isinstance(op, Confirm)]
    assert retargets and confirms
    assert ops.index(confirms[0]) > ops.index(retargets[0])
    assert any(op.claims.get("all") for op in retargets)
    link[0] = False  # the link went down between the check and the next claims change
    g2 = glue(link)
    ops2 = [op for i in range(30) for op in g2.tick(i * 0.1).kernel]
    assert [op for op in ops2 if isinstance(op, Confirm)]  # the claims did change
    assert all(not any(op.claims.values()) for op in ops2 if isinstance(op, Retarget))


class _Glue:
    """Records each batch; while handling one, ``arrive`` more datagrams land (as from
    peers whose heartbeats come in while this one is processed)."""

    def __init__(self, peer: socket.socket, arrive: int) -> None:
        self.peer, self.arrive = peer, arrive
        self.batches: list[list[bytes]] = []

    def received(self, datagrams: list[bytes], now: float) -> Actions:
        self.batches.append(list(datagrams))
        if self.arrive:
            self.arrive -= 1
            self.peer.send(b"hb-%d" % len(self.batches))
        return Actions()

    def next_deadline(self) -> float:
        return INF


def _drain(arrive: int) -> list[list[bytes]]:
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    loop = asyncio.new_event_loop()
    try:
        ours.setblocking(False)
        glue = _Glue(peer, arrive)
        hb = HeartbeatLoop.__new__(HeartbeatLoop)  # only the receive path: no config
        hb.glue, hb._sock, hb._loop, hb._timer = glue, ours, loop, None  # type: ignore[assignment]
        hb.log = lambda *a, **k: None  # type: ignore[assignment]
        peer.send(b"hb-0")
        hb._on_heartbeats()
        return glue.batches
    finally:
        loop.close()
        ours.close()
        peer.close()


def test_heartbeats_that_arrive_while_one_is_handled_are_read_in_the_same_wakeup() -> None:
    assert _drain(arrive=2) == [[b"hb-0"], [b"hb-1"], [b"hb-2"]]


def test_a_flood_cannot_hold_the_loop_beyond_the_drain_rounds() -> None:
    batches = _drain(arrive=100)
    assert len(batches) == DRAIN_ROUNDS  # the rest waits for the next trip through the loop


def test_a_pause_is_counted_in_status_and_metrics() -> None:
    """An input later than the deadline the glue handed out (plus the jitter bound) is a
    pause of this node: counted in ``status`` (``pauses``, ``paused_ms``) and metrics."""
    g = glue([True])
    g.tick(0.0)
    due = g.next_deadline()
    g.tick(due + g.config.jitter / 2)  # late, but within the bound: no pause
    assert g.status(due, {})["counters"]["pauses"] == 0
    due = g.next_deadline()
    out = g.tick(due + 0.25)
    assert [log.event for log in out.logs if log.event == "paused"] == ["paused"]
    counters = g.status(due + 0.25, {})["counters"]
    assert counters["pauses"] == 1 and counters["paused_ms"] == pytest.approx(250.0, abs=0.1)
    snap = Snapshot()
    g.fill_snapshot(snap)
    assert snap.pauses == 1
    assert snap.paused_seconds == pytest.approx(0.25, abs=1e-4)
