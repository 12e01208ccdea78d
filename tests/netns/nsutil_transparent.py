"""Helpers for the IP-transparency tests (root): addresses, ownership model, replies.

Owns: the back-end network's addresses for each family (:class:`Net`), the transparent-proxy
plumbing's mark, table and priority, the ruleset with a return group, which node owns a
request (bucket ``b`` belongs to ``live[b % len(live)]``), a snapshot of what the host setup
with transparency may touch, transparent sockets (``IP_TRANSPARENT``) standing for a proxy's
connection, and a round of replies from the back end reporting which node received each.

Must not: touch the root namespace or any namespace it is not given.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass

from multihost.dataplane.nft import netns_entered
from multihost.dataplane.ruleset import GroupBuckets, GroupSpec, ReturnSpec, RulesetSpec
from multihost.flowhash import RETURN_MODES, Flow, HashMode, flow_bucket
from tests.netns import nsutil

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
B, SEED = 40320, 0x7EED1234
VIP = ipaddress.IPv4Address("198.18.0.100")
GW = ipaddress.IPv4Address("198.19.0.1")
BACKEND = "198.19.0.9"
GROUP = ipaddress.IPv4Address("239.192.0.1")
GROUP_MAC = "01:00:5e:40:00:01"
MARK, TABLE, PRIO = 0x4D48, 4248, 4248
IP_TRANSPARENT = 19
#: The cluster (client-facing) interface: a veth pair of the node's own (no clients here).
FRONT_LINK = ("link add f0 type veth peer name f1", "link set f0 up", "link set f1 up")


IPV6_TRANSPARENT = 75


@dataclass(frozen=True)
class Net:
    """The addresses of one family's test network."""

    family: int
    vip: IPAddress
    gw: IPAddress
    backend: str
    group: IPAddress
    mac: str
    plen: int

    def node_addr(self, i: int) -> str:
        return f"198.19.0.1{i}" if self.family == 4 else f"2001:db8:1::1{i}"

    def client(self, i: int) -> IPAddress:
        return ipaddress.ip_address(f"198.18.5.{i}" if self.family == 4 else f"2001:db8:5::{i}")


NET4 = Net(4, VIP, GW, BACKEND, GROUP, GROUP_MAC, 24)
NET6 = Net(
    6,
    ipaddress.ip_address("2001:db8::100"),
    ipaddress.ip_address("2001:db8:1::1"),
    "2001:db8:1::9",
    ipaddress.ip_address("ff15::1"),
    "33:33:00:00:00:01",
    64,
)


def spec(mode: HashMode, net: Net = NET4) -> RulesetSpec:
    macs = ((net.family, net.mac),)
    ret = ReturnSpec("web_ret", "web", (net.gw,), "b0", RETURN_MODES[mode], macs)
    return RulesetSpec(B, SEED, (GroupSpec("web", (net.vip,), mode),), returns=(ret,))


def state(node: str, live: tuple[str, ...]) -> dict[str, GroupBuckets]:
    """Bucket b belongs to live[b % len(live)]."""
    mine = frozenset(b for b in range(B) if live[b % len(live)] == node)
    return {"web": GroupBuckets(owned=mine)}


def owner(
    mode: HashMode, client: IPAddress, cport: int, live: tuple[str, ...], net: Net = NET4
) -> str:
    bucket = flow_bucket(Flow(client, cport, net.vip, 80, "udp"), B, SEED, mode)
    return live[bucket % len(live)]


def snapshot_on(ns: str, iface: str) -> dict[str, list[str]]:
    """What the host setup with transparency may touch, as sorted lines of text."""
    text = {
        "rules4": nsutil.ns_run(ns, "ip", "-4", "rule").stdout,
        "rules6": nsutil.ns_run(ns, "ip", "-6", "rule").stdout,
        "routes4": nsutil.ns_run(ns, "ip", "-4", "route", "show", "table", "all").stdout,
        "routes6": nsutil.ns_run(ns, "ip", "-6", "route", "show", "table", "all").stdout,
        "nft": nsutil.ns_run(ns, "nft", "list", "ruleset").stdout,
        "addr_lo": nsutil.ns_run(ns, "ip", "addr", "show", "dev", "lo").stdout,
        "maddr_b0": nsutil.ns_run(ns, "ip", "maddr", "show", "dev", iface).stdout,
        "sysctl_b0": nsutil.ns_run(
            ns, "sysctl", f"net.ipv4.conf.{iface}.arp_ignore", f"net.ipv4.conf.{iface}.arp_announce"
        ).stdout,
    }
    return {k: sorted(v.splitlines()) for k, v in text.items()}


def transparent_socket(ns: str, client: str, cport: int, backend: str) -> socket.socket:
    v6 = ":" in client
    with netns_entered(ns):
        s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    if v6:
        s.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    s.setblocking(False)
    s.bind((client, cport))
    s.connect((backend, 53))
    return s


Counters = Callable[[str], dict[str, int]]  # node -> the return group's counters


def replies_round(
    be: str,
    ns: dict[str, str],
    counters: Counters,
    flows: list[tuple[IPAddress, int]],
    live: tuple[str, ...],
    *,
    backend: str = BACKEND,
) -> dict[tuple[IPAddress, int], list[str]]:
    """Send one reply per flow from the back end; who received each (by node)."""
    socks = {
        (role, f): transparent_socket(ns[role], str(f[0]), f[1], backend)
        for role in live
        for f in flows
    }
    before = {r: counters(r) for r in live}
    try:
        with netns_entered(be):
            tx = socket.socket(
                socket.AF_INET6 if ":" in backend else socket.AF_INET, socket.SOCK_DGRAM
            )
        tx.bind((backend, 53))
        with tx:
            for c, p in flows:
                tx.sendto(f"reply {c}:{p}".encode(), (str(c), p))

        def seen(r: str) -> int:
            now = counters(r)
            return sum(now[k] - before[r][k] for k in ("accepted_packets", "dropped_packets"))

        nsutil.wait_until(
            lambda: all(seen(r) >= len(flows) for r in live),
            what="every node's return filter to see every reply",
        )
        accepted = sum(
            counters(r)["accepted_packets"] - before[r]["accepted_packets"] for r in live
        )
        got: dict[tuple[IPAddress, int], list[str]] = {f: [] for f in flows}

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
