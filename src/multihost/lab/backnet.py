"""Pure description of what a lab has behind its nodes and in front of its clients.

Owns: the back-end network of a transparent lab (``lab up --transparent``: a second switch
``<prefix>bsw``, each node's back-end-facing interface and address, the back ends
``<prefix>b1``, ``<prefix>b2`` and their addresses, the return mode) and the upstream router
of a routed lab (``lab up --routed``: ``<prefix>rt`` between the clients and the switch), with
their addressing plan inside 198.19.0.0/16 (the front network is 198.18.0.0/16) and their JSON
form (``to_dict``/``from_dict``).

Must not: create, read or delete anything (no sockets, files, processes or netlink); build
(:mod:`multihost.lab.backbuild`) turns these into namespaces, links and services.

Addressing plan::

    198.19.0.0/17        the back-end network (one broadcast domain, switch <prefix>bsw)
    198.19.0.11 ...      node A, B, ...: its back-end-facing address (eth1; backend_gateway)
    198.19.0.100         gateway mode: the return traffic IP (the back ends' default route)
    198.19.K.1           back end bK's own address
    198.19.K.11 ...      routes mode: back end bK's address for node A, B, ... ([[backend]])
    198.19.128.0/17      the clients' side of the upstream router (routed labs)
    198.19.(128+K).0/24  client cK's link to the router: router .254, client .200 (primary)
                         and .1 ... .16 (extra sources)
    198.18.0.1           the router's address on the front network (the nodes' route back)
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

BACK_SUBNET = ipaddress.IPv4Network("198.19.0.0/17")
ROUTED_SUBNET = ipaddress.IPv4Network("198.19.128.0/17")
RETURN_VIP = "198.19.0.100"
ROUTER_FRONT = "198.18.0.1"
#: Router-side and client-side host numbers on a client's /24 link.
ROUTER_HOST, CLIENT_HOST = 254, 200
CLIENT_LINK_PREFIXLEN = 24
BACKENDS = 2
MAX_BACKENDS = 8
#: The nodes' back-end-facing interface.
NODE_BACK_INTERFACE = "eth1"
#: The back ends' return routes: node in slot s uses table TABLE_BASE + s.
TABLE_BASE = 100
RULE_PRIORITY_BASE = 1000


class ReturnMode(StrEnum):
    """How a back end's reply finds the node that holds the connection."""

    #: Per-node return routes (``multihost backend-routes --apply`` on each back end).
    ROUTES = "routes"
    #: A multi-hosted return gateway: the back ends' default route is a traffic IP.
    GATEWAY = "gateway"


class Proxy(StrEnum):
    """The transparent proxy each node runs in front of the back ends (from Debian)."""

    #: nginx ``proxy_bind $remote_addr transparent``: the client's address, a port of the
    #: kernel's choosing (with a return gateway: the ``source-ip`` hash on both groups).
    NGINX = "nginx"
    #: HAProxy ``source 0.0.0.0 usesrc client``: the client's address and port (with a
    #: return gateway: ``source-ip-port`` in front, ``destination-ip-port`` for replies);
    #: ``usesrc clientip`` (address only) with per-node return routes.
    HAPROXY = "haproxy"


def default_proxy(mode: ReturnMode) -> Proxy:
    """nginx for per-node return routes, HAProxy (address and port) for a return gateway."""
    return Proxy.HAPROXY if mode is ReturnMode.GATEWAY else Proxy.NGINX


def front_hash(mode: ReturnMode, proxy: Proxy) -> str:
    """The front group's hash mode: what a return gateway can hash the replies by."""
    if mode is ReturnMode.ROUTES:
        return "4-tuple"
    return "source-ip-port" if proxy is Proxy.HAPROXY else "source-ip"


class NeighMode(StrEnum):
    """How the upstream router learns the traffic IP's MAC."""

    #: ``ip neigh replace VIP lladdr <multicast MAC> nud permanent`` (what routers need).
    STATIC = "static"
    #: ARP only: the router, like RFC 1812 routers, drops ARP replies with a multicast
    #: sender MAC, so it never learns the traffic IP (a failure to demonstrate).
    ARP = "arp"


def _mac(role: int, index: int) -> str:
    return ":".join(f"{b:02x}" for b in (0x02, 0x6D, 0x68, role, 0x00, index))


@dataclass(frozen=True)
class Backend:
    """A back end: one namespace with one interface on the back-end switch, nginx on :80."""

    name: str
    netns: str
    interface: str
    switch_port: str
    mac: str
    address: str
    #: Routes mode: ``(node, address)`` per node, the address the node's proxy connects to.
    node_addresses: tuple[tuple[str, str], ...] = ()

    def address_for(self, node: str) -> str:
        """The address node ``node`` connects to (its own in routes mode)."""
        return dict(self.node_addresses).get(node, self.address)

    @property
    def addresses(self) -> tuple[str, ...]:
        return (self.address, *(a for _, a in self.node_addresses))

    def node_of(self, address: str) -> str | None:
        return next((n for n, a in self.node_addresses if a == address), None)


@dataclass(frozen=True)
class BackNet:
    """The back-end network of a transparent lab."""

    mode: ReturnMode
    netns: str  # the back-end switch
    backends: tuple[Backend, ...]
    #: ``(node, address)``: each node's back-end-facing address (``backend_gateway``).
    gateways: tuple[tuple[str, str], ...]
    proxy: Proxy = Proxy.NGINX
    bridge: str = "br0"
    interface: str = NODE_BACK_INTERFACE
    subnet: str = str(BACK_SUBNET)
    return_vip: str | None = None  # gateway mode

    @property
    def prefixlen(self) -> int:
        return ipaddress.IPv4Network(self.subnet).prefixlen

    def gateway(self, node: str) -> str:
        return dict(self.gateways)[node]

    def node_mac(self, index: int) -> str:
        """The MAC of the back-end-facing interface of the node in slot ``index``."""
        return _mac(0x0B, index + 1)

    def backend(self, name: str) -> Backend | None:
        return next((b for b in self.backends if b.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode.value,
            "proxy": self.proxy.value,
            "netns": self.netns,
            "bridge": self.bridge,
            "interface": self.interface,
            "subnet": self.subnet,
            "return_vip": self.return_vip,
            "gateways": [list(g) for g in self.gateways],
            "backends": [
                {
                    "name": b.name,
                    "netns": b.netns,
                    "interface": b.interface,
                    "switch_port": b.switch_port,
                    "mac": b.mac,
                    "address": b.address,
                    "node_addresses": [list(x) for x in b.node_addresses],
                }
                for b in self.backends
            ],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BackNet:
        return cls(
            mode=ReturnMode(d["mode"]),
            proxy=Proxy(d["proxy"]),
            netns=str(d["netns"]),
            bridge=str(d["bridge"]),
            interface=str(d["interface"]),
            subnet=str(d["subnet"]),
            return_vip=None if d.get("return_vip") is None else str(d["return_vip"]),
            gateways=tuple((str(n), str(a)) for n, a in d["gateways"]),
            backends=tuple(
                Backend(
                    name=str(b["name"]),
                    netns=str(b["netns"]),
                    interface=str(b["interface"]),
                    switch_port=str(b["switch_port"]),
                    mac=str(b["mac"]),
                    address=str(b["address"]),
                    node_addresses=tuple((str(n), str(a)) for n, a in b["node_addresses"]),
                )
                for b in d["backends"]
            ),
        )

    def summary(self) -> dict[str, Any]:
        """The ``transparent`` object of ``lab up --json``."""
        return {
            "return": self.mode.value,
            "proxy": self.proxy.value,
            "switch_netns": self.netns,
            "subnet": self.subnet,
            "return_vip": self.return_vip,
            "gateways": dict(self.gateways),
            "backends": {
                b.name: {
                    "netns": b.netns,
                    "address": b.address,
                    "node_addresses": dict(b.node_addresses),
                }
                for b in self.backends
            },
        }


@dataclass(frozen=True)
class Router:
    """The upstream router of a routed lab: front port on the switch, one link per client."""

    netns: str
    mac: str
    address: str  # on the front network
    neigh: NeighMode = NeighMode.STATIC
    interface: str = "eth0"
    switch_port: str = "p-rt"

    def to_dict(self) -> dict[str, Any]:
        return {
            "netns": self.netns,
            "mac": self.mac,
            "address": self.address,
            "neigh": self.neigh.value,
            "interface": self.interface,
            "switch_port": self.switch_port,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Router:
        return cls(
            netns=str(d["netns"]),
            mac=str(d["mac"]),
            address=str(d["address"]),
            neigh=NeighMode(d["neigh"]),
            interface=str(d["interface"]),
            switch_port=str(d["switch_port"]),
        )


def client_link(k: int) -> ipaddress.IPv4Network:
    """Client ``ck``'s /24 link to the router."""
    return ipaddress.IPv4Network(
        (int(ROUTED_SUBNET.network_address) + (k << 8), CLIENT_LINK_PREFIXLEN)
    )


def router_address_for(k: int) -> str:
    """The router's address on client ``ck``'s link (the client's default gateway)."""
    return str(client_link(k).network_address + ROUTER_HOST)


def client_addresses(k: int, extra: int) -> tuple[str, tuple[str, ...]]:
    """Client ``ck``'s primary and extra source addresses in a routed lab."""
    net = client_link(k).network_address
    return str(net + CLIENT_HOST), tuple(str(net + j) for j in range(1, extra + 1))


def describe_router(prefix: str, neigh: NeighMode = NeighMode.STATIC) -> Router:
    return Router(netns=f"{prefix}rt", mac=_mac(0x0F, 1), address=ROUTER_FRONT, neigh=neigh)


def describe_backnet(
    prefix: str,
    nodes: tuple[str, ...],
    mode: ReturnMode = ReturnMode.ROUTES,
    backends: int = BACKENDS,
    proxy: Proxy | None = None,
) -> BackNet:
    """The back-end network for ``nodes`` (slot order) with ``backends`` back ends."""
    if not 1 <= backends <= MAX_BACKENDS:
        raise ValueError(f"backends: {backends} is outside 1..{MAX_BACKENDS}")
    base = BACK_SUBNET.network_address
    gateways = tuple((n, str(base + 11 + i)) for i, n in enumerate(nodes))
    bes = tuple(
        Backend(
            name=f"b{k}",
            netns=f"{prefix}b{k}",
            interface="eth0",
            switch_port=f"p-b{k}",
            mac=_mac(0x0E, k),
            address=str(base + (k << 8) + 1),
            node_addresses=(
                tuple((n, str(base + (k << 8) + 11 + i)) for i, n in enumerate(nodes))
                if mode is ReturnMode.ROUTES
                else ()
            ),
        )
        for k in range(1, backends + 1)
    )
    return BackNet(
        mode=mode,
        proxy=default_proxy(mode) if proxy is None else proxy,
        netns=f"{prefix}bsw",
        backends=bes,
        gateways=gateways,
        return_vip=RETURN_VIP if mode is ReturnMode.GATEWAY else None,
    )


def check_backnet(bn: BackNet, nodes: tuple[str, ...], seen: set[str]) -> None:
    """Raise ValueError unless ``bn`` obeys the plan (``seen``: addresses used elsewhere)."""
    subnet = ipaddress.IPv4Network(bn.subnet)
    if not subnet.subnet_of(BACK_SUBNET):
        raise ValueError(f"back-end subnet {subnet} is outside {BACK_SUBNET}")
    if tuple(n for n, _ in bn.gateways) != nodes:
        raise ValueError("the back-end network needs one gateway per node, in slot order")
    addresses = [a for _, a in bn.gateways] + [a for b in bn.backends for a in b.addresses]
    if bn.return_vip is not None:
        addresses.append(bn.return_vip)
    if (bn.mode is ReturnMode.GATEWAY) != (bn.return_vip is not None):
        raise ValueError("a return traffic IP exactly in gateway mode")
    for a in addresses:
        if ipaddress.IPv4Address(a) not in subnet:
            raise ValueError(f"back-end address {a} is outside {subnet}")
        if a in seen:
            raise ValueError(f"back-end address {a} is used twice")
        seen.add(a)
    for b in bn.backends:
        if bn.mode is ReturnMode.ROUTES and tuple(n for n, _ in b.node_addresses) != nodes:
            raise ValueError(f"back end {b.name}: routes mode needs an address per node")
