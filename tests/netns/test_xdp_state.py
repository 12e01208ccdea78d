"""The loaded XDP program's state over time (``BPF_PROG_RUN``, root).

Owns: the lease (lapse stops new flows only; kept in jiffies, it lapses by itself by its
deadline), handover with local sockets and remembered UDP flows, a restarted agent adopting
the pinned program (and never serving the dead agent's table), and updates that flip whole
tables.  Namespace and pins as in ``test_xdp_prog.py`` (fixtures in conftest.py).
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import pytest

from multihost.dataplane import libbpf
from multihost.dataplane.ruleset import GroupBuckets, GroupSpec, RulesetSpec
from multihost.dataplane.xdp import XdpDataplane
from multihost.dataplane.xdplayout import NODE
from multihost.dataplane.xdpmaps import TICK_NS
from multihost.flowhash import Flow, HashMode, flow_bucket
from tests.netns import nsutil
from tests.netns import xdpframes as xf
from tests.netns.nsutil import ns_run
from tests.netns.xdpspec import BUCKETS, VIP4, web_spec


def test_lease_lapse_stops_new_flows_only(netns: str, pin_dir: Path) -> None:
    spec = web_spec(HashMode.FOUR_TUPLE, 3)
    dp = XdpDataplane(spec, "x0", pin_dir, netns=netns)
    flows = [Flow(xf.addr(f"198.18.3.{i}"), 40000 + i, VIP4, 80, "tcp") for i in range(1, 40)]
    udp = [Flow(f.saddr, f.sport, f.daddr, f.dport, "udp") for f in flows]
    allb = frozenset(range(BUCKETS))
    try:
        dp.install({"web": GroupBuckets(owned=allb)})
        assert all(dp.test_run(xf.frame(f))[0] == xf.XDP_PASS for f in flows + udp)
        dp.set_lease(0)
        assert not dp.lease_held()
        assert all(dp.test_run(xf.frame(f))[0] == xf.XDP_DROP for f in flows + udp)
        assert all(dp.test_run(xf.frame(f, flags=xf.ACK))[0] == xf.XDP_DROP for f in flows)
        assert dp.counters()["web"]["xdp_lease_lapsed_packets"] == 3 * len(flows)
        dp.set_lease(60_000)
        assert dp.lease_held()
        assert all(dp.test_run(xf.frame(f))[0] == xf.XDP_PASS for f in flows)
        dp.set_lease(None)
        assert dp.lease_held()
    finally:
        dp.remove()


def test_lease_in_jiffies_lapses_by_itself_no_later_than_its_deadline(
    netns: str, pin_dir: Path
) -> None:
    """The program compares the lease with jiffies (one inlined load).  Converted from the
    agent's CLOCK_MONOTONIC deadline, it ends no later than that deadline and at most about
    two ticks (the coarse clock's resolution) before it; a 300 ms lease then lapses in the
    kernel with no write from anybody."""
    spec = web_spec(HashMode.FOUR_TUPLE, 3)
    dp = XdpDataplane(spec, "x0", pin_dir, netns=netns)
    flow = Flow(xf.addr("198.18.3.9"), 40009, VIP4, 80, "udp")
    try:
        dp.install({"web": GroupBuckets(owned=frozenset(range(BUCKETS)))})
        for ms in (61_500, 400, 20):
            deadline = time.monotonic_ns() + ms * 1_000_000
            dp.set_lease(ms)
            raw = libbpf.map_lookup(dp._fd("mh_node"), struct.pack("=I", 0), NODE.size)
            assert raw is not None
            (lease,) = struct.unpack_from("=Q", raw)
            jiffies, coarse = dp._clocks()
            ends = coarse + (lease - jiffies) * TICK_NS  # jiffies reaches `lease` no earlier
            assert ends <= deadline, (ms, deadline - ends)
            assert ends > deadline - 3 * TICK_NS, (ms, deadline - ends)
            assert dp.lease_held()
        dp.set_lease(300)
        started = time.monotonic()
        assert dp.test_run(xf.frame(flow))[0] == xf.XDP_PASS
        nsutil.wait_until(
            lambda: dp.test_run(xf.frame(flow))[0] == xf.XDP_DROP, 5.0, 0.002, "the lease to lapse"
        )
        assert time.monotonic() - started > 0.3 - 3 * TICK_NS / 1e9
        assert not dp.lease_held()
        assert dp.counters()["web"]["xdp_lease_lapsed_packets"] >= 1
    finally:
        dp.remove()


def test_handover_uses_local_sockets_and_remembered_flows(netns: str, pin_dir: Path) -> None:
    """A real listening socket and a real connection in the namespace: the program finds them
    with bpf_skc_lookup_tcp (no conntrack), and a UDP flow passed while draining is
    remembered for the incoming side."""
    spec = RulesetSpec(BUCKETS, 5, (GroupSpec("web", (VIP4,), HashMode.FOUR_TUPLE),))
    dp = XdpDataplane(spec, "x0", pin_dir, netns=netns)
    from multihost.dataplane.nft import netns_entered

    with netns_entered(netns):
        ns_run(netns, "ip", "addr", "add", f"{VIP4}/32", "dev", "lo")
        ns_run(netns, "ip", "addr", "add", "198.18.4.1/32", "dev", "lo")
        lsock = socket.socket()
        lsock.bind((str(VIP4), 80))
        lsock.listen(8)
        csock = socket.socket()
        csock.bind(("198.18.4.1", 0))
        csock.connect((str(VIP4), 80))
        conn, _ = lsock.accept()
    try:
        cport = csock.getsockname()[1]
        est = Flow(xf.addr("198.18.4.1"), cport, VIP4, 80, "tcp")
        new = Flow(xf.addr("198.18.4.1"), cport + 1 if cport < 65535 else 1024, VIP4, 80, "tcp")
        all_b = frozenset(range(BUCKETS))
        dp.install({"web": GroupBuckets(draining=all_b)})
        assert dp.test_run(xf.frame(est, flags=xf.ACK))[0] == xf.XDP_PASS  # our connection
        assert dp.test_run(xf.frame(new, flags=xf.ACK))[0] == xf.XDP_DROP  # another node's
        assert dp.test_run(xf.frame(new, flags=xf.SYN))[0] == xf.XDP_DROP  # a new flow
        assert dp.test_run(xf.frame(est, flags=xf.SYN))[0] == xf.XDP_DROP  # never a SYN
        u = Flow(xf.addr("198.18.4.9"), 999, VIP4, 53, "udp")
        assert dp.test_run(xf.frame(u))[0] == xf.XDP_PASS  # draining: UDP passes, remembered
        rows = dp.flow_rows()
        assert ("198.18.4.1", cport, str(VIP4), 80, 6, None) in rows
        assert ("198.18.4.9", 999, str(VIP4), 53, 17, None) in rows
        dp.update({"web": GroupBuckets(incoming=all_b)})
        assert dp.test_run(xf.frame(u))[0] == xf.XDP_PASS  # remembered
        u2 = Flow(xf.addr("198.18.4.9"), 1000, VIP4, 53, "udp")
        assert dp.test_run(xf.frame(u2))[0] == xf.XDP_DROP  # another node's UDP flow
        assert dp.test_run(xf.frame(new, flags=xf.SYN))[0] == xf.XDP_PASS  # new flows: ours
        assert dp.test_run(xf.frame(new, flags=xf.ACK))[0] == xf.XDP_DROP  # old owner's
        assert dp.test_run(xf.frame(est, flags=xf.ACK))[0] == xf.XDP_PASS
        assert dp.read_state()["web"] == GroupBuckets(incoming=all_b)
    finally:
        for s in (conn, csock, lsock):
            s.close()
        dp.remove()


def test_restart_adopts_the_pinned_program(netns: str, pin_dir: Path) -> None:
    spec = web_spec(HashMode.FOUR_TUPLE, 9)
    first = XdpDataplane(spec, "x0", pin_dir, netns=netns)
    first.install({"web": GroupBuckets(owned=frozenset(range(100)))})
    pid = first.describe()["program_id"]
    first.close()  # the agent died: program and maps stay attached and pinned
    try:
        second = XdpDataplane(spec, "x0", pin_dir, netns=netns)
        second.install({"web": GroupBuckets(owned=frozenset(range(50)))})
        d = second.describe()
        assert d["program_id"] == pid and d["adopted"] is True
        assert second.read_state()["web"].owned == frozenset(range(50))
        second.remove()
        out = ns_run(netns, "ip", "-j", "link", "show", "x0").stdout
        assert '"xdp"' not in out
        assert not pin_dir.exists()
    finally:
        from multihost.dataplane.xdpattach import cleanup

        cleanup("x0", pin_dir, netns)


def test_restart_never_serves_the_dead_agents_table(
    netns: str, pin_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crashed agent's pinned table (its buckets, since taken over by peers) is replaced
    before the new agent's lease makes the node serve anything (regression: chaos saw a
    recovering node reset two of a survivor's streams in the old table's window)."""
    spec = web_spec(HashMode.FOUR_TUPLE, 9)
    first = XdpDataplane(spec, "x0", pin_dir, netns=netns)
    first.install({"web": GroupBuckets(owned=frozenset(range(100)))})
    first.set_lease(0)  # the agent died and its lease lapsed
    first.close()
    flow = next(
        f
        for p in range(1024, 65536)
        if 50 <= flow_bucket(f := Flow(xf.addr("198.18.4.1"), p, VIP4, 80, "tcp"), BUCKETS, 9) < 100
    )
    try:
        second = XdpDataplane(spec, "x0", pin_dir, netns=netns)
        verdicts: list[int] = []
        write_node = second._write_node

        def spy() -> None:
            write_node()
            verdicts.append(second.test_run(xf.frame(flow, flags=xf.ACK))[0])

        monkeypatch.setattr(second, "_write_node", spy)
        second.install({"web": GroupBuckets(owned=frozenset(range(50)))})
        assert second.describe()["adopted"] is True
        assert verdicts and set(verdicts) == {xf.XDP_DROP}, verdicts
        second.remove()
    finally:
        from multihost.dataplane.xdpattach import cleanup

        cleanup("x0", pin_dir, netns)


def test_update_flips_whole_tables(netns: str, pin_dir: Path) -> None:
    spec = web_spec(HashMode.FOUR_TUPLE, 21)
    dp = XdpDataplane(spec, "x0", pin_dir, netns=netns)
    try:
        dp.install({})
        a = GroupBuckets(owned=frozenset(range(0, BUCKETS, 2)))
        b = GroupBuckets(owned=frozenset(range(1, BUCKETS, 2)), draining=frozenset({0}))
        for _ in range(3):
            st = dp.update({"web": a})
            assert st.changed and dp.read_state()["web"] == a
            dp.update({"web": b})
            assert dp.read_state()["web"] == b
        assert dp.update({"web": b}).path == "none"
    finally:
        dp.remove()
