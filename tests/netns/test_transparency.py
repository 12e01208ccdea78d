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
"""

from __future__ import annotations

import contextlib
import ipaddress
import random
import resource
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from multihost.dataplane.backend import Backend
from multihost.dataplane.hostsetup import HostSetup
from multihost.dataplane.nft import Dataplane, Nft, netns_entered
from multihost.dataplane.ruleset import GroupBuckets, GroupSpec, ReturnSpec, RulesetSpec
from multihost.dataplane.transparent import TransparentSetup
from multihost.dataplane.xdp import XdpDataplane
from multihost.flowhash import RETURN_MODES, Flow, HashMode, flow_bucket
from tests.netns import nsutil

B, SEED = 40320, 0x7EED1234
VIP = ipaddress.IPv4Address("198.18.0.100")
GW = ipaddress.IPv4Address("198.19.0.1")
BACKEND = "198.19.0.9"
GROUP = ipaddress.IPv4Address("239.192.0.1")
GROUP_MAC = "01:00:5e:40:00:01"
MARK, TABLE, PRIO = 0x4D48, 4248, 4248
NODES = ("n1", "n2", "n3")
FLOWS = 300
IP_TRANSPARENT = 19
#: The cluster (client-facing) interface: a veth pair of the node's own (no clients here).
FRONT_LINK = ("link add f0 type veth peer name f1", "link set f0 up", "link set f1 up")


def spec(mode: HashMode) -> RulesetSpec:
    ret = ReturnSpec("web_ret", "web", (GW,), "b0", RETURN_MODES[mode], ((4, GROUP_MAC),))
    return RulesetSpec(B, SEED, (GroupSpec("web", (VIP,), mode),), returns=(ret,))


def state(node: str, live: tuple[str, ...]) -> dict[str, GroupBuckets]:
    """Bucket b belongs to live[b % len(live)]."""
    mine = frozenset(b for b in range(B) if live[b % len(live)] == node)
    return {"web": GroupBuckets(owned=mine)}


def owner(mode: HashMode, client: ipaddress.IPv4Address, cport: int, live: tuple[str, ...]) -> str:
    bucket = flow_bucket(Flow(client, cport, VIP, 80, "udp"), B, SEED, mode)
    return live[bucket % len(live)]


def _snapshot(ns: str) -> dict[str, list[str]]:
    """What the transparency plumbing may touch, as sorted lines of text."""
    text = {
        "rules4": nsutil.ns_run(ns, "ip", "-4", "rule").stdout,
        "rules6": nsutil.ns_run(ns, "ip", "-6", "rule").stdout,
        "routes4": nsutil.ns_run(ns, "ip", "-4", "route", "show", "table", "all").stdout,
        "routes6": nsutil.ns_run(ns, "ip", "-6", "route", "show", "table", "all").stdout,
        "nft": nsutil.ns_run(ns, "nft", "list", "ruleset").stdout,
        "maddr_b0": nsutil.ns_run(ns, "ip", "maddr", "show", "dev", "b0").stdout,
        "sysctl_b0": nsutil.ns_run(
            ns, "sysctl", "net.ipv4.conf.b0.arp_ignore", "net.ipv4.conf.b0.arp_announce"
        ).stdout,
    }
    return {k: sorted(v.splitlines()) for k, v in text.items()}


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
    backend: str, bpf_root: Path, mode: HashMode
) -> Iterator[tuple[str, dict[str, str], dict[str, Backend]]]:
    nsutil.cleanup_stale()
    with nsutil.netns_group("sw", "be", *NODES) as ns:
        sw = ns["sw"]
        nsutil.ip_batch(sw, ["link add br0 type bridge mcast_snooping 0", "link set br0 up"])
        for i, role in enumerate(("be", *NODES)):
            nsutil.veth(ns[role], "b0", sw, f"p{i}")
            nsutil.run("ip", "-n", sw, "link", "set", f"p{i}", "master", "br0")
        nsutil.ip_batch(
            ns["be"],
            [
                f"addr add {BACKEND}/24 dev b0",
                f"route add default via {GW}",
                f"neigh replace {GW} lladdr {GROUP_MAC} dev b0 nud permanent",
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
                    [*FRONT_LINK, f"addr add 198.19.0.1{i}/24 dev b0"],
                )
                t = TransparentSetup(MARK, TABLE, PRIO, [4], netns=node)
                host = HostSetup(
                    "f0", [VIP, GW], GROUP, netns=node, extra_interfaces=["b0"], transparent=t
                )
                host.apply()
                hosts.append(host)
                dp: Backend
                if backend == "nft":
                    nft = Nft(netns=node)
                    nfts.append(nft)
                    dp = Dataplane(spec(mode), nft)
                else:
                    dp = XdpDataplane(spec(mode), "f0", bpf_root / f"{node}-pins", netns=node)
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


def _transparent_socket(ns: str, client: str, cport: int) -> socket.socket:
    with netns_entered(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        s.setblocking(False)
        s.bind((client, cport))
        s.connect((BACKEND, 53))
    return s


def _replies_round(
    be: str,
    ns: dict[str, str],
    planes: dict[str, Backend],
    flows: list[tuple[ipaddress.IPv4Address, int]],
    live: tuple[str, ...],
) -> dict[tuple[ipaddress.IPv4Address, int], list[str]]:
    """Send one reply per flow from the back end; who received each (by node)."""
    socks = {
        (role, f): _transparent_socket(ns[role], str(f[0]), f[1]) for role in live for f in flows
    }
    before = {r: planes[r].counters()["web_ret"] for r in live}
    try:
        with netns_entered(be):
            tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tx.bind((BACKEND, 53))
        with tx:
            for c, p in flows:
                tx.sendto(f"reply {c}:{p}".encode(), (str(c), p))

        def seen(r: str) -> int:
            now = planes[r].counters()["web_ret"]
            return sum(now[k] - before[r][k] for k in ("accepted_packets", "dropped_packets"))

        nsutil.wait_until(
            lambda: all(seen(r) >= len(flows) for r in live),
            what="every node's return filter to see every reply",
        )
        accepted = sum(
            planes[r].counters()["web_ret"]["accepted_packets"] - before[r]["accepted_packets"]
            for r in live
        )
        got: dict[tuple[ipaddress.IPv4Address, int], list[str]] = {f: [] for f in flows}

        def drain() -> int:
            for (role, f), s in socks.items():
                with contextlib.suppress(BlockingIOError):
                    while True:
                        data = s.recv(100)
                        assert data == f"reply {f[0]}:{f[1]}".encode()
                        got[f].append(role)
            return sum(len(v) for v in got.values())

        nsutil.wait_until(lambda: drain() >= accepted, what="accepted replies at the sockets")
        assert accepted == len(flows), f"{accepted} replies accepted for {len(flows)} sent"
        return got
    finally:
        for s in socks.values():
            s.close()


@pytest.mark.parametrize("mode", list(RETURN_MODES))
def test_each_reply_reaches_exactly_the_owner_of_its_request(
    lab_backend: str, bpf_root: Path, mode: HashMode
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    rng = random.Random(f"transparent-{mode.value}")
    clients = [ipaddress.IPv4Address(f"198.18.5.{i}") for i in range(1, 6)]
    flows = [(rng.choice(clients), p) for p in rng.sample(range(20000, 60000), FLOWS)]
    with _network(lab_backend, bpf_root, mode) as (be, ns, planes):
        got = _replies_round(be, ns, planes, flows, NODES)
        want = {f: [owner(mode, f[0], f[1], NODES)] for f in flows}
        wrong = {f: (got[f], want[f]) for f in flows if got[f] != want[f]}
        assert not wrong, f"{len(wrong)} of {len(flows)} replies wrong: {list(wrong.items())[:3]}"
        assert {owners[0] for owners in got.values()} == set(NODES)  # all three served

        # n3 fails: its buckets move to n1 and n2 -- and its replies with them
        planes["n3"].remove()
        survivors = ("n1", "n2")
        for role in survivors:
            planes[role].update(state(role, survivors))
        got = _replies_round(be, ns, planes, flows, survivors)
        want = {f: [owner(mode, f[0], f[1], survivors)] for f in flows}
        wrong = {f: (got[f], want[f]) for f in flows if got[f] != want[f]}
        assert not wrong, f"after the failure, {len(wrong)} wrong: {list(wrong.items())[:3]}"
