"""Native XDP behind a NIC-like wire: the program serves exactly the owned TCP flows.

A physical NIC hands its driver single frames; the driver runs XDP before any skb exists and
builds a fresh one after ``XDP_PASS``, so the rewritten destination MAC makes the segment
``PACKET_HOST`` and TCP takes it (docs/xdp.md, "Modes").  veth's own native XDP sees skbs
instead (``auto`` therefore picks generic mode on veth).  Here the node's veth gets frames the
way a NIC driver does: ``client`` c0 <-> w0 [``wire``: two one-line XDP programs redirect
w0 <-> w1] w1 <-> n0 ``node``, so every frame reaches n0's NAPI ring as an ``xdp_frame``
(the data-plane benchmark's emulated NIC, ``bench/dp_net.py`` ``Lab.wire``).  Checksum
offload is off at both ends: a redirected frame carries no partial checksum.  No sleeps.
"""

from __future__ import annotations

import os
import random
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from bench import bpfgen

from multihost.dataplane.hostsetup import HostSetup
from multihost.dataplane.nft import netns_entered
from multihost.dataplane.ruleset import GroupBuckets
from multihost.dataplane.xdp import XdpDataplane
from multihost.flowhash import HashMode
from tests.netns import nsutil
from tests.netns.nsutil_dp import (
    CLIENT,
    GROUP,
    GROUP_MAC,
    NODE,
    POOL,
    SCATTERED,
    SPEC1,
    VIP,
    counter,
    established,
    predicted,
    random_flows,
)


@dataclass
class Wired:
    client: str
    node: str
    pins: Path


def _wire(wire: str, a: str, b: str) -> list[int]:
    """Cross-connect ``a`` and ``b`` in ``wire`` with native XDP redirects; the fds (programs
    and links: closing them detaches)."""
    fds: list[int] = []
    with netns_entered(wire):
        ia, ib = socket.if_nametoindex(a), socket.if_nametoindex(b)
        for dev, out in ((ia, ib), (ib, ia)):
            prog = bpfgen.load_redirect_program(out)
            fds.append(prog)
            fds.append(bpfgen.xdp_link(prog, dev))
    return fds


@pytest.fixture
def wired(bpf_root: Path) -> Iterator[Wired]:
    nsutil.cleanup_stale()
    with nsutil.netns_group("client", "wire", "node") as ns:
        client, wire, node = ns["client"], ns["wire"], ns["node"]
        for n in (client, wire, node):
            nsutil.sysctl(n, "net.ipv6.conf.default.accept_dad", "0")
        nsutil.veth(client, "c0", wire, "w0")
        nsutil.veth(wire, "w1", node, "n0")
        nsutil.ip_batch(
            client,
            [f"addr add {CLIENT}/24 dev c0"]
            + [f"addr add {a}/32 dev c0" for a in POOL]
            + [
                "route add 198.18.1.0/24 dev c0",
                f"neigh replace {VIP} lladdr {GROUP_MAC} dev c0 nud permanent",
            ],
        )
        nsutil.ip_batch(
            node, [f"addr add {NODE}/24 dev n0", f"route add 198.18.2.0/24 via {CLIENT}"]
        )
        # GRO on: veth receives in NAPI mode, which frames redirected into it need
        nsutil.ns_run(client, "ethtool", "-K", "c0", "tx", "off", "gro", "on")
        nsutil.ns_run(node, "ethtool", "-K", "n0", "tx", "off", "gro", "on")
        fds = _wire(wire, "w0", "w1")
        host = HostSetup("n0", [VIP], GROUP, netns=node)
        try:
            host.apply()
            yield Wired(client, node, bpf_root / f"{node}-pins")
        finally:
            host.restore()
            for fd in reversed(fds):
                os.close(fd)


def test_native_xdp_behind_a_nic_like_wire_serves_exactly_the_owned_tcp_flows(
    wired: Wired,
) -> None:
    dp = XdpDataplane(SPEC1, "n0", wired.pins, netns=wired.node, mode="native")
    try:
        dp.install({"web": GroupBuckets(owned=SCATTERED)})
        assert dp.describe()["mode"] == "native"
        flows = random_flows(random.Random(11), 160, [80], POOL)
        want = predicted(flows, VIP, HashMode.FOUR_TUPLE, SCATTERED, "tcp")
        got = nsutil.tcp_round(wired.client, wired.node, counter(dp, "web"), VIP, flows, owned=want)
        assert got == want
        assert 0 < len(want) < len(flows)
        # Bulk data over an owned flow crosses as MTU-sized frames, one program run each.
        flow = sorted(want)[0]
        passed0 = dp.counters()["web"]["xdp_owned_packets"]
        assert _transfer(wired, flow, 4 << 20) == 4 << 20
        passed = dp.counters()["web"]["xdp_owned_packets"] - passed0
        assert passed >= (4 << 20) // 1500, f"{passed} frames for 4 MiB"
    finally:
        dp.remove()


def _transfer(wired: Wired, flow: nsutil.FlowT, size: int) -> int:
    """Send ``size`` bytes over ``flow`` (client -> node, port 80); bytes the node read."""
    with established(wired, flow) as (conn, served):
        got: list[int] = []

        def read() -> None:  # concurrently: the sender blocks once the buffers are full
            n = 0
            while chunk := served.recv(1 << 16):
                n += len(chunk)
            got.append(n)

        reader = threading.Thread(target=read)
        reader.start()
        conn.sendall(b"x" * size)
        conn.shutdown(socket.SHUT_WR)
        reader.join(timeout=10)
        assert got, "the node did not read to the end"
        return got[0]
