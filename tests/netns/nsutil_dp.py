"""The data-plane tests' lab: a client and a node namespace, their addresses, and traffic.

Owns: the addresses and ruleset specs of ``test_dataplane*.py`` (also used by
``test_xdp_native.py``): ``client`` (c0 198.18.0.2/24, sources 198.18.2.x/32) and ``node``
(n0 198.18.0.1/24, traffic IPs on lo via HostSetup); the client reaches the traffic IPs through
the cluster's *multicast* MAC (static neighbour), so the node gets L2 multicast as in a
cluster.  Also the model's prediction of the flows a node owns, UDP/TCP rounds counted by a
data plane's group counters, and an established TCP connection.  The fixtures that build the
lab (``lab``, ``make_dp``) are in conftest.py.

Must not: touch the root namespace, or configure addresses outside 198.18.0.0/15 (IPv6 uses
the kernel's link-local addresses).
"""

from __future__ import annotations

import contextlib
import ipaddress
import random
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from multihost.assignment import assign
from multihost.dataplane.backend import Backend
from multihost.dataplane.nft import Nft, netns_entered
from multihost.dataplane.ruleset import GroupBuckets, GroupSpec, RulesetSpec
from multihost.flowhash import Flow, HashMode, IPAddress, flow_bucket
from multihost.macaddr import format_mac, multicast_mac
from tests.netns import nsutil

ip4 = ipaddress.IPv4Address
B = 40320
SEED = 0x5EED1234
GROUP = ip4("239.192.0.1")
GROUP_MAC = format_mac(multicast_mac(GROUP))
VIP = ip4("198.18.1.100")  # group "web", 4-tuple
VIP3 = ip4("198.18.1.101")  # group "tri", 3-tuple
VIPS = ip4("198.18.1.102")  # group "src", source-ip
CLIENT = ip4("198.18.0.2")
NODE = ip4("198.18.0.1")
POOL = [ip4(f"198.18.2.{i}") for i in range(1, 65)]
SCATTERED = assign({0, 1}).buckets(0)  # 2 of 8 live: 20160 buckets in ~2000 ranges
CONTIGUOUS = frozenset(range(5040, 10080))  # slot 1 with all 8 live: one range
FlowT = nsutil.FlowT
WEB = GroupSpec("web", (VIP,))
SPEC1 = RulesetSpec(B, SEED, (WEB,))
TRI, SRC = (
    GroupSpec("tri", (VIP3,), HashMode.THREE_TUPLE),
    GroupSpec("src", (VIPS,), HashMode.SOURCE_IP),
)
SPEC3 = RulesetSpec(B, SEED, (WEB, TRI, SRC))
FOUR = HashMode.FOUR_TUPLE
MakeDp = Callable[[RulesetSpec], Backend]


@dataclass
class Lab:
    client: str
    node: str
    nft: Nft


def make_lab(ns: dict[str, str]) -> Lab:
    client, node = ns["client"], ns["node"]
    nsutil.client_node(client, node, f"{CLIENT}/24", f"{NODE}/24", POOL)
    mac = [f"neigh replace {v} lladdr {GROUP_MAC} dev c0 nud permanent" for v in (VIP, VIP3, VIPS)]
    nsutil.ip_batch(client, ["route add 198.18.1.0/24 dev c0", *mac])  # via the multicast MAC
    return Lab(client, node, Nft(netns=node))


def owning(buckets: frozenset[int]) -> dict[str, GroupBuckets]:
    return {g: GroupBuckets(owned=buckets) for g in ("web", "tri", "src")}


def predicted(
    flows: list[FlowT], vip: IPAddress, mode: HashMode, owned: frozenset[int], proto: str = "udp"
) -> set[FlowT]:
    return {
        f for f in flows if flow_bucket(Flow(f[0], f[1], vip, f[2], proto), B, SEED, mode) in owned
    }


def random_flows(
    rng: random.Random, n: int, dports: list[int], sources: Sequence[IPAddress]
) -> list[FlowT]:
    return [
        (rng.choice(sources), p, rng.choice(dports)) for p in rng.sample(range(20000, 60000), n)
    ]


def counter(dp: Backend, group: str) -> nsutil.Counter:
    def read() -> tuple[int, int]:
        c = dp.counters()[group]
        # per datagram, as nft counts reassembled ones: XDP also counts later fragments
        later = c.get("xdp_frag_passed_packets", 0), c.get("xdp_frag_dropped_packets", 0)
        return c["accepted_packets"] - later[0], c["dropped_packets"] - later[1]

    return read


def udp_round(
    lab: Lab, dp: Backend, group: str, vip: IPAddress, flows: list[FlowT], **kw: int
) -> set[FlowT]:
    return nsutil.udp_round(lab.client, lab.node, counter(dp, group), vip, flows, **kw)


def tcp_round(lab: Lab, dp: Backend, flows: list[FlowT], owned: set[FlowT]) -> set[FlowT]:
    return nsutil.tcp_round(lab.client, lab.node, counter(dp, "web"), VIP, flows, owned=owned)


class Ends(Protocol):
    """A client namespace and a node namespace (a :class:`Lab` or any other pair)."""

    client: str
    node: str


@contextlib.contextmanager
def established(lab: Ends, flow: FlowT) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A TCP connection of ``flow`` (port 80) from the client to the node: (client, server)."""
    listener = nsutil.socket_in(lab.node, socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((str(VIP), 80))
    listener.listen(64)
    conn = nsutil.socket_in(lab.client, socket.AF_INET, socket.SOCK_STREAM)
    try:
        with netns_entered(lab.client):
            conn.bind((str(flow[0]), flow[1]))
        conn.settimeout(5)
        conn.connect((str(VIP), 80))
        served, _ = listener.accept()
        with served:
            served.settimeout(5)
            yield conn, served
    finally:
        conn.close()
        listener.close()
