"""Pure description of a lab: hosts, addresses, MACs, the traffic IP, the group, the seed.

Owns: :class:`Topology` (a whole lab: its switch (:mod:`multihost.lab.switch`), nodes and
clients (:mod:`multihost.lab.hosts`, laid out by :mod:`multihost.lab.addressing`), traffic
IPs, groups, seed, table, and in transparent or routed labs what is behind the nodes and in
front of the clients: :mod:`multihost.lab.backnet`), :func:`describe` (a lab from ``lab up``'s
choices), :func:`check` (the hard rules every topology obeys: the naming scheme of
:mod:`multihost.lab.naming`, the addressing plan of :mod:`multihost.lab.addressing`), and the
JSON form of a topology (``to_dict``/``from_dict``; ``summary`` is ``lab up --json``).

Must not: create, read or delete anything (no sockets, files, processes or netlink);
:mod:`multihost.lab.build` turns a :class:`Topology` into namespaces.
"""

from __future__ import annotations

import ipaddress
import secrets
from dataclasses import dataclass, field
from typing import Any

from multihost.assignment import PreferenceTable
from multihost.lab.addressing import (
    DEFAULT_GROUP,
    DEFAULT_GROUP6,
    DEFAULT_VIP,
    DEFAULT_VIP6,
    GROUP_RANGE,
    GROUP_RANGE6,
    LAB_RANGE,
    SUBNET,
    SUBNET6,
    check_host,
    client_hosts,
    node_hosts,
)
from multihost.lab.backnet import (
    BackNet,
    NeighMode,
    Proxy,
    ReturnMode,
    Router,
    check_backnet,
    client_link,
    describe_backnet,
    describe_router,
    front_hash,
)
from multihost.lab.hosts import Host, host_dict, host_from
from multihost.lab.naming import (
    MAX_CLIENTS,
    MAX_NODES,
    NODE_NAMES,
    TopologyError,
    default_prefix,
    netns_pattern,
    validate_prefix,
)
from multihost.lab.switch import Switch, SwitchMode
from multihost.macaddr import format_mac, multicast_mac
from multihost.tablechoice import MAX_TABLE_SLOTS, TABLE_KINDS, cluster_table

__all__ = ["Host", "Switch", "SwitchMode", "Topology", "describe"]

#: ``multihost.assignment.default_table().buckets`` (8! orderings): labs of up to 8 nodes;
#: bigger (or weighted) labs use their cluster table's (``Topology.table``).
BUCKETS = 40320
#: Source ports the lab's probes choose explicitly ([lo, hi)).  A client namespace's own
#: ephemeral ports (curl, wrk) start at ``hi`` (``wiring.configure_host``), so a probe's
#: planned 4-tuple never meets an earlier curl's TIME_WAIT (connect: EADDRNOTAVAIL).
PROBE_PORTS = (10000, 61000)
HTTP_PORT = 80
ECHO_PORT = 7
HASH_MODE = "4-tuple"


@dataclass(frozen=True)
class Topology:
    prefix: str
    switch: Switch
    nodes: tuple[Host, ...]
    clients: tuple[Host, ...]
    vip: str = DEFAULT_VIP
    group: str = DEFAULT_GROUP
    seed: int = 0
    buckets: int = BUCKETS
    port: int = HTTP_PORT
    echo_port: int = ECHO_PORT
    hash_mode: str = HASH_MODE
    subnet: str = field(default=str(SUBNET))
    #: Dual stack with IPv6 heartbeats (``vip6`` and ``group6`` set, hosts have addresses6).
    vip6: str | None = None
    group6: str | None = None
    #: A transparent lab's back-end network (``lab up --transparent``).
    backnet: BackNet | None = None
    #: A routed lab's upstream router between the clients and the switch (``--routed``).
    router: Router | None = None
    #: ``[[node]].weight`` of each node in slot order (empty: every node weighs 1).
    weights: tuple[int, ...] = ()
    #: ``[cluster] table`` of the agents (``lab up --table``).
    table_kind: str = "factorial"

    @property
    def node_weights(self) -> tuple[int, ...]:
        return self.weights or (1,) * len(self.nodes)

    @property
    def weighted(self) -> bool:
        return any(w != 1 for w in self.node_weights)

    @property
    def table(self) -> PreferenceTable:
        """The cluster table the agents choose for this lab (node ``i`` in slot ``i``)."""
        return cluster_table(tuple(enumerate(self.node_weights)), self.table_kind)

    @property
    def ipv6(self) -> bool:
        return self.vip6 is not None

    @property
    def vips(self) -> tuple[str, ...]:
        """The traffic IPs: the IPv4 one, and the IPv6 one in a dual-stack lab."""
        return (self.vip,) if self.vip6 is None else (self.vip, self.vip6)

    def vip_of(self, family: int) -> str:
        if family == 6:
            if self.vip6 is None:
                raise TopologyError("this lab has no IPv6 traffic IP (use 'lab up --ipv6')")
            return self.vip6
        return self.vip

    @property
    def heartbeat_group(self) -> str:
        """Where the agents' heartbeats go: ``group6`` in a dual-stack lab, else ``group``."""
        return self.group6 or self.group

    @property
    def members(self) -> tuple[str, ...]:
        """Node names in slot order (member ``i`` occupies slot ``i``)."""
        return tuple(n.name for n in self.nodes)

    @property
    def hosts(self) -> tuple[Host, ...]:
        return (*self.nodes, *self.clients)

    @property
    def group_mac(self) -> str:
        return format_mac(multicast_mac(self.group))

    @property
    def group6_mac(self) -> str | None:
        return None if self.group6 is None else format_mac(multicast_mac(self.group6))

    @property
    def seed_text(self) -> str:
        return f"{self.seed:#010x}"

    def netns_names(self) -> tuple[str, ...]:
        """Every namespace of the lab, switch first."""
        extra: list[str] = []
        if self.router is not None:
            extra.append(self.router.netns)
        if self.backnet is not None:
            extra += [self.backnet.netns, *(b.netns for b in self.backnet.backends)]
        return (self.switch.netns, *(h.netns for h in self.hosts), *extra)

    def netns_of(self, name: str) -> str:
        """The namespace of a host (:meth:`host`), ``sw``, ``bsw``, ``rt`` or a back end."""
        if name in ("sw", "switch"):
            return self.switch.netns
        if name == "rt" and self.router is not None:
            return self.router.netns
        if self.backnet is not None:
            if name == "bsw":
                return self.backnet.netns
            if (b := self.backnet.backend(name)) is not None:
                return b.netns
        return self.host(name).netns

    def host(self, name: str) -> Host:
        """A node or client by name; ``client`` means the first client."""
        if name == "client" and self.clients:
            return self.clients[0]
        for h in self.hosts:
            if h.name == name:
                return h
        known = ", ".join(h.name for h in self.hosts)
        raise TopologyError(f"no host {name!r} in this lab (hosts: {known}, client)")

    def node_by_address(self, address: str) -> Host | None:
        return next(
            (n for n in self.nodes if address in n.addresses or address in n.addresses6), None
        )

    def summary(self) -> dict[str, Any]:
        """The ``lab up --json`` object."""
        return {
            "vip": self.vip,
            "port": self.port,
            "client_netns": self.clients[0].netns,
            "nodes": {
                n.name: {
                    "netns": n.netns,
                    "address": n.address,
                    "address6": n.address6,
                    "mac": n.mac,
                }
                for n in self.nodes
            },
            "vip6": self.vip6,
            "group6": self.group6,
            "group6_mac": self.group6_mac,
            "ipv6": self.ipv6,
            "members": list(self.members),
            "weights": dict(zip(self.members, self.node_weights, strict=True)),
            "seed": self.seed_text,
            "buckets": self.buckets,
            "table": self.table_kind,
            "prefix": self.prefix,
            "group": self.group,
            "group_mac": self.group_mac,
            "echo_port": self.echo_port,
            "hash": self.hash_mode,
            "switch": {"netns": self.switch.netns, "mode": self.switch.mode.value},
            "transparent": None if self.backnet is None else self.backnet.summary(),
            "routed": None if self.router is None else self.router.to_dict(),
            "clients": {
                c.name: {
                    "netns": c.netns,
                    "address": c.address,
                    "address6": c.address6,
                    "sources": len(c.addresses),
                }
                for c in self.clients
            },
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "switch": {
                "netns": self.switch.netns,
                "bridge": self.switch.bridge,
                "mode": self.switch.mode.value,
            },
            "nodes": [host_dict(h) for h in self.nodes],
            "clients": [host_dict(h) for h in self.clients],
            "vip": self.vip,
            "group": self.group,
            "seed": self.seed,
            "buckets": self.buckets,
            "port": self.port,
            "echo_port": self.echo_port,
            "hash_mode": self.hash_mode,
            "subnet": self.subnet,
            "vip6": self.vip6,
            "group6": self.group6,
            "backnet": None if self.backnet is None else self.backnet.to_dict(),
            "router": None if self.router is None else self.router.to_dict(),
            "weights": list(self.weights),
            "table_kind": self.table_kind,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Topology:
        try:
            sw = d["switch"]
            topo = cls(
                prefix=str(d["prefix"]),
                switch=Switch(str(sw["netns"]), str(sw["bridge"]), SwitchMode(sw["mode"])),
                nodes=tuple(host_from(h) for h in d["nodes"]),
                clients=tuple(host_from(h) for h in d["clients"]),
                vip=str(d["vip"]),
                group=str(d["group"]),
                seed=int(d["seed"]),
                buckets=int(d["buckets"]),
                port=int(d["port"]),
                echo_port=int(d["echo_port"]),
                hash_mode=str(d["hash_mode"]),
                subnet=str(d["subnet"]),
                vip6=None if d.get("vip6") is None else str(d["vip6"]),
                group6=None if d.get("group6") is None else str(d["group6"]),
                backnet=None if d.get("backnet") is None else BackNet.from_dict(d["backnet"]),
                router=None if d.get("router") is None else Router.from_dict(d["router"]),
                weights=tuple(int(w) for w in d.get("weights", ())),
                table_kind=str(d.get("table_kind", "factorial")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise TopologyError(f"malformed topology record: {e!r}") from None
        check(topo)
        return topo


def describe(
    nodes: int,
    clients: int = 1,
    prefix: str | None = None,
    *,
    seed: int | None = None,
    vip: str = DEFAULT_VIP,
    group: str = DEFAULT_GROUP,
    switch_mode: SwitchMode = SwitchMode.SNOOPING,
    ipv6: bool = False,
    transparent: ReturnMode | None = None,
    routed: bool = False,
    router_neigh: NeighMode = NeighMode.STATIC,
    proxy: Proxy | None = None,
    weights: dict[str, int] | None = None,
    table_kind: str = "factorial",
) -> Topology:
    """Describe a lab of ``nodes`` nodes (A, B, ...) and ``clients`` clients (c1, ...).

    ``prefix`` defaults to :func:`default_prefix`; ``seed`` to a random 32-bit value;
    ``ipv6``: dual stack with IPv6 heartbeats (:mod:`multihost.lab.addressing`'s plan);
    ``transparent``: a back-end network with this return mode (:mod:`multihost.lab.backnet`);
    ``proxy``: the nodes' transparent proxy (default: :func:`backnet.default_proxy`);
    ``routed``: the clients sit behind a router (``router_neigh``: how it learns the VIP);
    ``weights``: node name -> ``[[node]].weight`` (others weigh 1);
    ``table_kind``: the agents' ``[cluster] table`` (:mod:`multihost.tablechoice`).
    """
    prefix = validate_prefix(default_prefix() if prefix is None else prefix)
    if not 1 <= nodes <= MAX_NODES:
        raise TopologyError(f"nodes: {nodes} is outside 1..{MAX_NODES}")
    names = NODE_NAMES[:nodes]
    node_weights: tuple[int, ...] = ()
    if weights:
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise TopologyError(f"weights: no node {unknown[0]!r} (nodes: {','.join(names)})")
        node_weights = tuple(weights.get(n, 1) for n in names)
        if min(node_weights) < 1:
            raise TopologyError(f"weights: {weights} has a weight below 1")
        if sum(node_weights) > MAX_TABLE_SLOTS:
            raise TopologyError(
                f"weights add up to {sum(node_weights)}; a table holds at most"
                f" {MAX_TABLE_SLOTS} slots"
            )
    if not 1 <= clients <= MAX_CLIENTS:
        raise TopologyError(f"clients: {clients} is outside 1..{MAX_CLIENTS}")
    if seed is None:
        seed = secrets.randbits(32)
    if routed and ipv6:
        raise TopologyError("a routed lab is IPv4 only (--routed with --ipv6)")
    if transparent is not None and ipv6:
        raise TopologyError("a transparent lab is IPv4 only (--transparent with --ipv6)")
    lab_nodes = node_hosts(prefix, names, ipv6=ipv6)
    lab_clients = client_hosts(prefix, clients, ipv6=ipv6, routed=routed)
    backnet = (
        None
        if transparent is None
        else describe_backnet(
            prefix, tuple(n.name for n in lab_nodes), ReturnMode(transparent), proxy=proxy
        )
    )
    topo = Topology(
        prefix=prefix,
        switch=Switch(netns=f"{prefix}sw", mode=SwitchMode(switch_mode)),
        nodes=lab_nodes,
        clients=lab_clients,
        vip=vip,
        group=group,
        seed=seed,
        vip6=DEFAULT_VIP6 if ipv6 else None,
        group6=DEFAULT_GROUP6 if ipv6 else None,
        backnet=backnet,
        router=describe_router(prefix, NeighMode(router_neigh)) if routed else None,
        hash_mode=HASH_MODE if backnet is None else front_hash(backnet.mode, backnet.proxy),
        weights=node_weights if any(w != 1 for w in node_weights) else (),
        buckets=cluster_table(tuple(enumerate(node_weights or (1,) * nodes)), table_kind).buckets,
        table_kind=table_kind,
    )
    check(topo)
    return topo


def check(topo: Topology) -> None:
    """Raise :class:`TopologyError` unless ``topo`` obeys the lab's hard rules."""
    validate_prefix(topo.prefix)
    if topo.table_kind not in TABLE_KINDS:
        raise TopologyError(f"table {topo.table_kind!r} is not one of {', '.join(TABLE_KINDS)}")
    if topo.weights:
        if len(topo.weights) != len(topo.nodes) or min(topo.weights) < 1:
            raise TopologyError(f"weights {list(topo.weights)}: one integer >= 1 per node")
        if sum(topo.weights) > MAX_TABLE_SLOTS:
            raise TopologyError(
                f"weights add up to {sum(topo.weights)}; a table holds at most"
                f" {MAX_TABLE_SLOTS} slots"
            )
    if topo.buckets != topo.table.buckets:
        raise TopologyError(
            f"{topo.buckets} buckets, but the cluster table has {topo.table.buckets}"
        )
    if not 0 <= topo.seed <= 0xFFFFFFFF:
        raise TopologyError(f"seed {topo.seed:#x} is not a 32-bit value")
    try:
        group = ipaddress.IPv4Address(topo.group)
        vip = ipaddress.IPv4Address(topo.vip)
    except ValueError as e:
        raise TopologyError(str(e)) from None
    if group not in GROUP_RANGE:
        raise TopologyError(f"group {group} is outside {GROUP_RANGE}")
    subnet = ipaddress.IPv4Network(topo.subnet)
    if not subnet.subnet_of(LAB_RANGE) or vip not in subnet:
        raise TopologyError(f"traffic IP {vip} must be in the lab subnet {subnet}")
    if (topo.vip6 is None) != (topo.group6 is None):
        raise TopologyError("a dual-stack lab needs both vip6 and group6")
    if topo.vip6 is not None and topo.group6 is not None:
        try:
            vip6 = ipaddress.IPv6Address(topo.vip6)
            group6 = ipaddress.IPv6Address(topo.group6)
        except ValueError as e:
            raise TopologyError(str(e)) from None
        if group6 not in GROUP_RANGE6:
            raise TopologyError(f"group {group6} is outside {GROUP_RANGE6}")
        if vip6 not in SUBNET6:
            raise TopologyError(f"traffic IP {vip6} must be in the lab subnet {SUBNET6}")
    pattern = netns_pattern(topo.prefix)
    seen: set[str] = {topo.vip, *([topo.vip6] if topo.vip6 else [])}
    macs: set[str] = set()
    for name in topo.netns_names():
        if not pattern.match(name):
            raise TopologyError(f"namespace {name!r} does not match the lab's naming scheme")
    if topo.router is not None:
        seen.add(topo.router.address)
        if ipaddress.IPv4Address(topo.router.address) not in subnet:
            raise TopologyError(f"router address {topo.router.address} is outside {subnet}")
    for h in topo.hosts:
        net = subnet
        if topo.router is not None and h.role == "client":
            net = client_link(int(h.name[1:]))
        check_host(h, net, ipv6=topo.ipv6, seen=seen, macs=macs)
    if topo.backnet is not None:
        if topo.ipv6:
            raise TopologyError("a transparent lab is IPv4 only")
        try:
            check_backnet(topo.backnet, topo.members, seen)
        except ValueError as e:
            raise TopologyError(str(e)) from None
    if topo.router is not None and topo.ipv6:
        raise TopologyError("a routed lab is IPv4 only")
    if len(set(topo.netns_names())) != len(topo.netns_names()):
        raise TopologyError("namespace names are not unique")
