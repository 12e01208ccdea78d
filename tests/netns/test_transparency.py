"""IP transparency on the nodes with real packets: the multi-hosted return gateway.

Three nodes and a back end on one bridge (the back-end network).  The back end's default
gateway is the return group's address, resolved to the cluster MAC, so each of its replies
reaches every node.  On every node a transparent UDP socket stands for a proxy's connection
from the client's address and port to the back end (``IP_TRANSPARENT``, bound to the
client's address: not local), and the node runs the data plane (both backends) and the host
setup with the transparent-proxy plumbing (``socket transparent`` mark, fwmark rule, local
route).  Every reply must be delivered to exactly one socket: the one on the node that owns
the *request's* bucket (front group hash on the client's address and port).  When a node
fails and its buckets move, its replies move with them.

Owns: that network and its replies, and the host setup with transparency restoring the host
exactly.  Helpers: tests/netns/nsutil_transparent.py.  Two real agents serving the gateway
are in ``test_transparency_agents.py``.
"""

from __future__ import annotations

import contextlib
import random
import resource
from collections.abc import Iterator
from pathlib import Path

import pytest

from multihost.dataplane.backend import Backend
from multihost.dataplane.hostsetup import HostSetup
from multihost.dataplane.nft import Dataplane, Nft
from multihost.dataplane.transparent import TransparentSetup
from multihost.dataplane.xdp import XdpDataplane
from multihost.flowhash import RETURN_MODES, HashMode
from tests.netns import nsutil
from tests.netns.nsutil_transparent import (
    FRONT_LINK,
    GROUP,
    GROUP_MAC,
    GW,
    MARK,
    NET4,
    NET6,
    PRIO,
    TABLE,
    VIP,
    Counters,
    Net,
    owner,
    replies_round,
    snapshot_on,
    spec,
    state,
)

NODES = ("n1", "n2", "n3")
FLOWS = 300


def _snapshot(ns: str) -> dict[str, list[str]]:
    return snapshot_on(ns, "b0")


def test_host_setup_with_transparency_restores_the_host_exactly() -> None:
    nsutil.cleanup_stale()
    with nsutil.netns_group("peer", "node") as ns:
        node = ns["node"]
        nsutil.sysctl(node, "net.ipv6.conf.default.accept_dad", "0")
        nsutil.veth(ns["peer"], "p0", node, "b0")
        nsutil.ip_batch(node, [*FRONT_LINK])
        for iface in ("b0", "f0", "f1"):  # IPv6 link-local routes and groups settled
            nsutil.link_local(node, iface)
        nsutil.run("ip", "-n", node, "rule", "add", "fwmark", "7", "lookup", "77", "prio", "77")
        before = _snapshot(node)
        t = TransparentSetup(MARK, TABLE, PRIO, [4, 6], netns=node)
        host = HostSetup("f0", [VIP, GW], GROUP, netns=node, extra_interfaces=["b0"], transparent=t)
        host.apply()
        try:
            during = _snapshot(node)
            for fam in ("4", "6"):
                rule = f"{PRIO}:\tfrom all fwmark {MARK:#x} lookup {TABLE}"
                assert rule in during[f"rules{fam}"]
                local = f"local default dev lo table {TABLE} "
                assert any(r.startswith(local) for r in during[f"routes{fam}"])
            nft = "\n".join(during["nft"])
            assert f"socket transparent 1 meta mark set {MARK:#010x}" in nft
            assert any(GROUP_MAC in line for line in during["maddr_b0"])  # cluster MAC
            assert "net.ipv4.conf.b0.arp_ignore = 1" in during["sysctl_b0"]
        finally:
            host.restore()
        host.restore()  # idempotent
        assert _snapshot(node) == before

        # a routing table someone else uses is refused, and nothing is left changed
        nsutil.run("ip", "-n", node, "route", "add", "198.18.9.0/24", "dev", "f0", "table", "4249")
        bad = HostSetup(
            "f0",
            [VIP],
            GROUP,
            netns=node,
            transparent=TransparentSetup(MARK, 4249, PRIO, [4], netns=node),
        )
        before = _snapshot(node)
        with pytest.raises(Exception, match="routing table 4249 already holds"):
            bad.apply()
        assert _snapshot(node) == before


@contextlib.contextmanager
def _network(
    backend: str, bpf_root: Path, mode: HashMode, net: Net = NET4
) -> Iterator[tuple[str, dict[str, str], dict[str, Backend]]]:
    nsutil.cleanup_stale()
    with nsutil.netns_group("sw", "be", *NODES) as ns:
        sw = ns["sw"]
        for role in ("be", *NODES):
            nsutil.sysctl(ns[role], "net.ipv6.conf.default.accept_dad", "0")
        nsutil.ip_batch(sw, ["link add br0 type bridge mcast_snooping 0", "link set br0 up"])
        for i, role in enumerate(("be", *NODES)):
            nsutil.veth(ns[role], "b0", sw, f"p{i}")
            nsutil.run("ip", "-n", sw, "link", "set", f"p{i}", "master", "br0")
        nsutil.ip_batch(
            ns["be"],
            [
                f"addr add {net.backend}/{net.plen} dev b0",
                f"route add default via {net.gw}",
                f"neigh replace {net.gw} lladdr {net.mac} dev b0 nud permanent",
            ],
        )
        hosts: list[HostSetup] = []
        planes: dict[str, Backend] = {}
        nfts: list[Nft] = []
        try:
            for i, role in enumerate(NODES):
                node = ns[role]
                nsutil.ip_batch(
                    node,
                    [*FRONT_LINK, f"addr add {net.node_addr(i)}/{net.plen} dev b0"],
                )
                t = TransparentSetup(MARK, TABLE, PRIO, [net.family], netns=node)
                host = HostSetup(
                    "f0",
                    [net.vip, net.gw],
                    net.group,
                    netns=node,
                    extra_interfaces=["b0"],
                    transparent=t,
                )
                host.apply()
                hosts.append(host)
                dp: Backend
                if backend == "nft":
                    nft = Nft(netns=node)
                    nfts.append(nft)
                    dp = Dataplane(spec(mode, net), nft)
                else:
                    pins = bpf_root / f"{node}-pins"
                    dp = XdpDataplane(spec(mode, net), "f0", pins, netns=node)
                dp.install(state(role, NODES))
                planes[role] = dp
            yield ns["be"], ns, planes
        finally:
            for dp in planes.values():
                with contextlib.suppress(Exception):
                    dp.remove()
                dp.close()
            for nft in nfts:
                nft.close()
            for host in hosts:
                host.restore()


def _plane_counters(planes: dict[str, Backend]) -> Counters:
    return lambda role: planes[role].counters()["web_ret"]


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("mode", list(RETURN_MODES))
def test_each_reply_reaches_exactly_the_owner_of_its_request(
    lab_backend: str, bpf_root: Path, mode: HashMode, family: int
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    net = NET4 if family == 4 else NET6
    rng = random.Random(f"transparent-{mode.value}-{family}")
    clients = [net.client(i) for i in range(1, 6)]
    flows = [(rng.choice(clients), p) for p in rng.sample(range(20000, 60000), FLOWS)]
    with _network(lab_backend, bpf_root, mode, net) as (be, ns, planes):
        got = replies_round(be, ns, _plane_counters(planes), flows, NODES, backend=net.backend)
        want = {f: [owner(mode, f[0], f[1], NODES, net)] for f in flows}
        wrong = {f: (got[f], want[f]) for f in flows if got[f] != want[f]}
        assert not wrong, f"{len(wrong)} of {len(flows)} replies wrong: {list(wrong.items())[:3]}"
        assert {owners[0] for owners in got.values()} == set(NODES)  # all three served

        # n3 fails: its buckets move to n1 and n2 -- and its replies with them
        planes["n3"].remove()
        survivors = ("n1", "n2")
        for role in survivors:
            planes[role].update(state(role, survivors))
        got = replies_round(be, ns, _plane_counters(planes), flows, survivors, backend=net.backend)
        want = {f: [owner(mode, f[0], f[1], survivors, net)] for f in flows}
        wrong = {f: (got[f], want[f]) for f in flows if got[f] != want[f]}
        assert not wrong, f"after the failure, {len(wrong)} wrong: {list(wrong.items())[:3]}"
