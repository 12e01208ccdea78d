"""Hostile input and faults against a running lab (root): spoofed and replayed heartbeats
from a rogue host on the switch, an ARP flood, heartbeat loss, partitions with and without
quorum, and an agent crash loop under load; plus fuzzing of the heartbeat decoder and the
membership core (pure, but kept here with the rest of the hostile-input checks).

One 5-node lab per module (its prefix ``mhtCh<hex>-``); the rogue host is a namespace named
like a lab client (``<prefix>c8``, so ``lab clean`` removes it too) with a veth into the
switch bridge and address 198.18.0.250.  Every test leaves the lab converged and healthy.

The labs here run ``dead_after_ms = 1000`` (heartbeats every 100 ms as by default): on a
shared, CPU-starved host an agent can stall for more than the default 400 ms, and the
resulting false failovers (measured by ``bench/bench_loss.py`` and the chaos runs, see
docs/reliability.md) must not be mistaken for effects of the input under test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multihost.lab import agents, build, chaos, faults, netfaults
from multihost.lab.clean import clean
from multihost.lab.failover import agent_status, owned_mask, ownership_problem, wait_converged
from multihost.lab.probe import run_probe
from multihost.lab.state import LabState
from multihost.lab.topology import describe
from multihost.membership.config import MembershipConfig
from multihost.membership.effects import ClaimsChanged, Rejected, ViewChanged
from multihost.membership.protocol import MembershipCore
from multihost.membership.wire import MAC_SIZE, MAX_SIZE, Heartbeat, WireError, decode, encode, mac
from tests.netns.nsutil_rogue import ETH_P_ARP, ROGUE_ADDR, Rogue, arp_frame
from tests.wire_v1 import encode_v1

DEAD_AFTER_MS = 1000
T = TypeVar("T")


def wait_until(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.02)
    return value


def statuses(state: LabState) -> dict[str, dict[str, Any]]:
    out = {}
    for n in state.topology.members:
        st_ = agent_status(state, n, timeout=2.0)
        assert st_ is not None, f"agent {n} does not answer"
        out[n] = st_
    return out


def _rec(state: LabState, node: str) -> dict[str, Any]:
    rec = agents.agent_record(state, node)
    assert rec is not None
    return rec


def polled(fn: Callable[[], T]) -> T | None:
    """``fn()``, or None if an agent did not answer (a stalled agent: poll again)."""
    try:
        return fn()
    except AssertionError:
        return None


def log_sizes(state: LabState) -> dict[str, int]:
    return {n: Path(_rec(state, n)["log"]).stat().st_size for n in state.topology.members}


def log_since(state: LabState, sizes: dict[str, int]) -> dict[str, str]:
    out = {}
    for n in state.topology.members:
        with open(_rec(state, n)["log"], "rb") as f:
            f.seek(sizes[n])
            out[n] = f.read().decode(errors="replace")
    return out


def lab_key(state: LabState) -> bytes:
    return (state.directory / "agents" / "key").read_bytes().strip()


@pytest.fixture(scope="module")
def lab(lab_backend: str) -> Iterator[LabState]:
    prefix = f"mhtCh{secrets.token_hex(2)}-"
    try:
        state = build.build(
            describe(5, prefix=prefix), dead_after_ms=DEAD_AFTER_MS, backend=lab_backend
        )
        wait_converged(state, state.topology.members, timeout=30)
        yield state
    finally:
        clean(prefix)


@pytest.fixture(scope="module")
def rogue(lab: LabState) -> Iterator[Rogue]:
    r = Rogue(lab)
    try:
        yield r
    finally:
        r.close()


# ------------------------------------------------------------- spoofing and replay


def _sign(body: bytes, key: bytes) -> bytes:
    return body + mac(key, body)


def _expected(reason: str, sender: str | None, node: str) -> str:
    """What agent ``node`` must count for an authenticated message from ``sender``."""
    return "self" if sender == node and reason in ("unknown-sender", "replay") else reason


def test_spoofed_and_replayed_heartbeats_are_rejected_and_counted(
    lab: LabState, rogue: Rogue
) -> None:
    key = lab_key(lab)
    captured = rogue.capture(per_node=3)
    real = decode(captured["B"][-1], key)
    far = real.seq + 10**6  # newer than anything B sent: only the named check can refuse it

    def forged(k: bytes = key, **change: Any) -> bytes:
        return encode(dataclasses.replace(real, seq=far, **change), k)

    body = forged()[:-MAC_SIZE]
    rng = random.Random(7)
    # (datagram, reason for a receiver that is not the named sender, named sender)
    msgs: list[tuple[bytes, str, str | None]] = [
        (forged(b"W" * 32), "bad-mac", None),
        (forged(cluster="elsewhere"), "other-cluster", None),
        (forged(sender="Z", slot=7), "unknown-sender", None),
        (forged(slot=0), "unknown-sender", "B"),
        (b"", "truncated", None),
        (captured["A"][0][:30], "truncated", None),
        (captured["A"][0] + bytes(MAX_SIZE), "oversize", None),
        (_sign(b"XXXX" + body[4:], key), "bad-magic", None),
        (_sign(body[:4] + b"\x09" + body[5:], key), "wrong-version", None),
        (_sign(body + b"\0", key), "malformed", None),
        # the previous release's format (8-bit masks): refused, named, logged once
        (encode_v1(dataclasses.replace(real, seq=far), key), "old-version", None),
    ]
    for _ in range(20):  # garbage: what it must count is whatever decode says
        junk = rng.randbytes(rng.randrange(0, 1300))
        with pytest.raises(WireError) as info:
            decode(junk, key)
        msgs.append((junk, info.value.reason, None))
    for sender, payloads in captured.items():  # replays of real heartbeats
        msgs += [(p, "replay", sender) for p in payloads]
    expected = {n: Counter(_expected(r, s, n) for _, r, s in msgs) for n in lab.topology.members}
    before, sizes = statuses(lab), log_sizes(lab)
    with rogue.sender() as tx:
        for data, _, _ in msgs:
            tx.sendto(data, (lab.topology.group, agents.HEARTBEAT_PORT))

    def deltas() -> dict[str, Counter[str]]:
        now = statuses(lab)
        return {
            n: Counter(
                {
                    r: v - before[n]["counters"]["rejected"][r]
                    for r, v in now[n]["counters"]["rejected"].items()
                    if v != before[n]["counters"]["rejected"][r]
                }
            )
            for n in now
        }

    wait_until(lambda: polled(deltas) == expected, 10, f"rejections {expected}")
    after = statuses(lab)
    for n in lab.topology.members:
        b, a = before[n], after[n]
        assert a["counters"]["view_changes"] == b["counters"]["view_changes"], n
        assert a["groups"]["web"]["owned"] == b["groups"]["web"]["owned"], n
        assert a["live"] == list(lab.topology.members), n
        assert {m["state"] for m in a["members"].values()} == {"alive"}, n
    accepted = {n: s["counters"]["heartbeats_accepted"] for n, s in before.items()}

    def more_accepted() -> bool:
        now = polled(lambda: statuses(lab))
        return now is not None and all(
            s["counters"]["heartbeats_accepted"] >= accepted[n] + 20 for n, s in now.items()
        )

    wait_until(more_accepted, 10, "20 more heartbeats accepted by every agent")
    for n, text in log_since(lab, sizes).items():
        assert "view-changed" not in text and "member-" not in text, (n, text)
        assert text.count("old-wire-version") == 1, (n, text)
    assert deltas() == expected  # nothing more trickled in


# ------------------------------------------------------------------------ ARP flood


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_arp_flood_no_false_failover_and_agents_stay_responsive(
    lab: LabState, rogue: Rogue, record_property: Callable[[str, object], None]
) -> None:
    topo = lab.topology
    rmac = bytes.fromhex("026d68fe0001")
    bcast = b"\xff" * 6
    rng = random.Random(3)
    frames = [arp_frame(1, rmac, ROGUE_ADDR, topo.vip, bcast)] * 4  # hosted: every node answers
    frames += [arp_frame(1, rmac, ROGUE_ADDR, "198.18.0.99", bcast)] * 2  # not hosted
    frames += [bcast + rmac + b"\x08\x06" + rng.randbytes(rng.randrange(0, 60)) for _ in range(10)]
    pids = {n: int(_rec(lab, n)["pid"]) for n in topo.members}
    before, sizes = statuses(lab), log_sizes(lab)
    cpu0, t0 = {n: _cpu_seconds(p) for n, p in pids.items()}, time.monotonic()
    tx = rogue.open_socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
    tx.bind(("eth0", ETH_P_ARP))
    stop, sent = threading.Event(), [0]

    def flood() -> None:
        while not stop.is_set():
            for f in frames:
                with contextlib.suppress(OSError):  # ENOBUFS: the queue is full
                    tx.send(f)
                    sent[0] += 1

    flooder = threading.Thread(target=flood)
    flooder.start()
    worst = 0.0
    try:
        while time.monotonic() - t0 < 3.0:
            for n in topo.members:
                t = time.monotonic()
                assert agent_status(lab, n, timeout=3.0) is not None, f"agent {n} unresponsive"
                worst = max(worst, time.monotonic() - t)
    finally:
        stop.set()
        flooder.join()
        tx.close()
    wall = time.monotonic() - t0
    cpu = {n: round((_cpu_seconds(p) - cpu0[n]) / wall, 2) for n, p in pids.items()}
    after = statuses(lab)
    arp = {n: after[n]["arp"]["arp_replies"] - before[n]["arp"]["arp_replies"] for n in after}
    record_property("arp_flood", {"frames_sent": sent[0], "seconds": round(wall, 1),
                                  "agent_cpu_share": cpu, "replies": arp,
                                  "status_latency_max_ms": round(worst * 1000)})  # fmt: skip
    assert all(v > 0 for v in arp.values()), arp  # the flood reached every responder
    assert worst < 2.0, f"status took {worst:.2f}s during the flood"
    for n in topo.members:
        assert after[n]["counters"]["view_changes"] == before[n]["counters"]["view_changes"], (
            n, log_since(lab, sizes)[n][-2000:], cpu)  # fmt: skip
    wait_converged(lab, topo.members, timeout=10)


# ---------------------------------------------------------------------- loss


def test_heartbeat_loss_rules_drop_what_they_say(lab: LabState) -> None:
    topo = lab.topology
    try:
        netfaults.set_loss(lab, 100, ["E"])  # E hears nobody and nobody hears E
        wait_until(
            lambda: (
                (agent_status(lab, "A") or {}).get("live") == ["A", "B", "C", "D"]
                and (agent_status(lab, "E") or {}).get("live") == ["E"]
            ),
            10,
            "E cut off",
        )
        netfaults.set_loss(lab, 0, ["E"])
        wait_converged(lab, topo.members, timeout=20)
        sent0 = sum(s["counters"]["heartbeats_sent"] for s in statuses(lab).values())
        netfaults.set_loss(lab, 10)  # at the switch, per receiver
        wait_until(lambda: netfaults.counters(lab).get("sw", 0) >= 300, 20, "300 drops")
        sent = sum(s["counters"]["heartbeats_sent"] for s in statuses(lab).values()) - sent0
        drops = netfaults.counters(lab)["sw"]
        share = drops / (sent * (len(topo.nodes) - 1))  # each heartbeat: 4 copies
        assert 0.05 < share < 0.2, (drops, sent)  # (copies to non-node ports count too)
    finally:
        netfaults.heal(lab)
    assert netfaults.counters(lab) == {}
    wait_converged(lab, topo.members, timeout=20)


# ------------------------------------------------------------------- partitions


def _split(state: LabState) -> Callable[[], bool]:
    def check() -> bool:
        a, d = agent_status(state, "A"), agent_status(state, "D")
        return bool(a and d and a["live"] == ["A", "B", "C"] and d["live"] == ["D", "E"])

    return check


def _probe(state: LabState, seed: int, seconds: float = 2.0, rate: float = 150) -> dict[str, Any]:
    """New connections for ``seconds``; ``seed`` picks the flows (never reuse one in a lab:
    a server-side TIME_WAIT of the same 4-tuple could refuse it)."""
    req = {"streams": 0, "rate": rate, "timeout": 5.0, "seed": seed}
    with chaos.Traffic(state, req) as t:
        time.sleep(seconds)  # traffic for this long (not synchronisation)
        rows = t.stop()
    res = chaos.analyse(rows, [], {n.mac: n.name for n in state.topology.nodes}, t.t_ready)
    res["answered_by"] = dict(Counter(r["node"] for r in rows if r["node"]))
    return res


def _owners(state: LabState) -> npt.NDArray[np.int16]:
    """How many agents own each bucket (an agent that does not answer in 2 s: an error)."""
    count = np.zeros(state.topology.buckets, dtype=np.int16)
    for s in statuses(state).values():
        count += owned_mask(s, state.topology.buckets)
    return count


def _owned_twice(state: LabState) -> int:
    """Buckets owned by two agents or more (0 while an agent does not answer: poll again)."""
    with contextlib.suppress(AssertionError):
        return int((_owners(state) > 1).sum())
    return 0


def test_partition_without_quorum_serves_buckets_twice(
    lab: LabState, record_property: Callable[[str, object], None]
) -> None:
    try:
        netfaults.partition(lab, ["A", "B", "C"], ["D", "E"])
        wait_until(_split(lab), 10, "two views A,B,C | D,E")
        twice = wait_until(lambda: _owned_twice(lab), 10, "buckets owned twice")
        res = _probe(lab, seed=101)
    finally:
        netfaults.heal(lab)
    record_property("partition_no_quorum", {"buckets_owned_twice": twice, **res})
    assert twice > 0 and res["duplicates"] > 0, res  # split brain, shown with real packets
    wait_converged(lab, lab.topology.members, timeout=30)


def test_partition_with_quorum_minority_stops_serving(
    record_property: Callable[[str, object], None], lab_backend: str
) -> None:
    prefix = f"mhtCq{secrets.token_hex(2)}-"
    try:
        state = build.build(
            describe(5, prefix=prefix),
            quorum=True,
            dead_after_ms=DEAD_AFTER_MS,
            backend=lab_backend,
        )
        wait_converged(state, state.topology.members, timeout=30)
        netfaults.partition(state, ["A", "B", "C"], ["D", "E"])
        wait_until(_split(state), 10, "two views A,B,C | D,E")
        wait_until(lambda: ownership_problem(state, ["A", "B", "C"]) is None, 15, "A,B,C own all")
        minority = {n: statuses(state)[n] for n in ("D", "E")}
        assert all(not s["quorum_ok"] for s in minority.values())
        assert all(s["groups"]["web"]["owned"]["buckets"] == 0 for s in minority.values())
        assert int((_owners(state) != 1).sum()) == 0  # the majority partitions the space
        res = _probe(state, seed=102)
        record_property("partition_quorum", res)
        assert res["duplicates"] == 0, res
        assert set(res["answered_by"]) <= {"A", "B", "C"}, res
        netfaults.heal(state)
        wait_converged(state, state.topology.members, timeout=30)
    finally:
        clean(prefix)


# ------------------------------------------------------------------ crash loop


def test_agent_crash_loop_under_load_settles_to_an_exact_partition(
    lab: LabState, record_property: Callable[[str, object], None]
) -> None:
    topo = lab.topology
    with chaos.Traffic(lab, {"streams": 4, "rate": 40, "timeout": 5.0, "seed": 103}) as t:
        for _ in range(5):
            faults.fail(lab, "C", "crash")
            faults.recover(lab, "C")  # returns once the new agent answers; kill it again
        rows = t.stop()
    during = chaos.analyse(rows, [], {n.mac: n.name for n in topo.nodes}, t.t_ready)
    wait_converged(lab, topo.members, timeout=60, quiet=True)
    owners = _owners(lab)
    assert int(owners.min()) == int(owners.max()) == 1  # every bucket owned exactly once
    after = run_probe(lab, "tcp", 1000, port_seed=11)
    res = _probe(lab, seed=104)
    keys = ("attempted", "failed", "duplicates", "lost_other", "duplicate_examples")
    record_property("crash_loop", {"during": {k: during[k] for k in keys}, "after": res})
    # During the loop a peer may stall past its lease (see docs/reliability.md); the
    # property checked is the settled state: an exact partition and clean probes.
    assert (after.mispredicted, after.failed, after.reset, after.timeout) == (0, 0, 0, 0)
    assert res["duplicates"] == 0 and res["failed"] == 0, res


# --------------------------------------------------------------- fuzzing (pure)

KEY = b"k" * 32
MEMBERS = {"n0": 0, "n1": 1, "n2": 2}


def _core() -> MembershipCore:
    cfg = MembershipConfig(
        cluster="c",
        node="n0",
        members=MEMBERS,
        groups={"web": frozenset(MEMBERS)},
        key=KEY,
        interval=0.1,
        dead_after=0.4,
    )
    return MembershipCore(cfg, b"\1" * 8, 0.0)


def _valid(slot: int, seq: int) -> Heartbeat:
    name = f"n{slot}"
    return Heartbeat(cluster="c", sender=name, slot=slot, boot=bytes([slot]) * 8, seq=seq,
                     digest=b"", view=0b111, applied_view=0b111)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=MAX_SIZE + 64), max_size=20))
def test_core_counts_and_ignores_unauthenticated_datagrams(datagrams: list[bytes]) -> None:
    core = _core()
    for i, d in enumerate(datagrams):
        effects = core.receive(d, 0.01 * i)
        assert not any(isinstance(e, ViewChanged | ClaimsChanged) for e in effects)
        assert any(isinstance(e, Rejected) for e in effects)
    c = core.counters()
    assert c.received == len(datagrams) == sum(c.rejected.values())
    assert c.accepted == 0 and core.view == frozenset({"n0"})


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_resigned_mutations_raise_wire_errors_or_round_trip(data: st.DataObject) -> None:
    """A key holder's mutated body: decode raises WireError or yields a heartbeat that
    survives encode/decode.  (Not always byte-identical: bitmaps with trailing zero bytes
    are accepted — see docs/reliability.md.)"""
    body = bytearray(encode(_valid(1, data.draw(st.integers(1, 2**64 - 1))), KEY)[:-MAC_SIZE])
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["set", "insert", "delete"]))
        pos = data.draw(st.integers(0, len(body)))
        if op == "set" and pos < len(body):
            body[pos] = data.draw(st.integers(0, 255))
        elif op == "insert":
            body[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif pos < len(body):
            del body[pos : pos + data.draw(st.integers(1, 8))]
    datagram = _sign(bytes(body), KEY)
    try:
        hb = decode(datagram, KEY)
    except WireError:
        return
    assert decode(encode(hb, KEY), KEY) == hb
