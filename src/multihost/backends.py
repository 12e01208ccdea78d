"""Back ends behind the cluster: the ``[[backend]]`` tables and ``[[node]].backend_gateway``.

With IP transparency a back end sees the client's own address, so its reply must be routed
to the node that holds the connection.  Each node reaches each back end on an address of
its own (one per node on the back end), and the back end routes by source address:
``ip rule from <address for node i> lookup <table i>``, table *i*: ``default via <node i's
backend_gateway>`` (``docs/transparency.md``).

Owns: the schema of those keys, their defaults and validation (every error a
:class:`~multihost.config.ConfigError` naming file, key path and value, like the rest of the
configuration), and the per-node return path of each back end (:class:`ReturnPath`: the
address on the back end, the node's gateway, table and rule priority).
:func:`parse_backends` is called by :func:`multihost.config.parse_config`, so the agent,
``check-config`` and ``backend-routes`` see the same validated result.

Must not: touch the network or the kernel, or read files (pure: TOML values in, frozen
dataclasses out).  The commands a back end needs are :mod:`multihost.backendplan`'s.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from multihost.config_fields import Reader
from multihost.config_model import NAME_RE, ConfigError, GroupConfig, IPAddress, NodeConfig

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

#: Defaults: node in slot *s* uses table ``table_base + s`` and rule priority
#: ``rule_priority_base + s`` on every back end.
DEFAULT_TABLE_BASE = 100
DEFAULT_RULE_PRIORITY_BASE = 1000
#: Routing tables the kernel reserves: unspec, default, main, local.
RESERVED_TABLES = {0: "unspec", 253: "default", 254: "main", 255: "local"}
MAX_TABLE = 0xFFFFFFFF
#: Rule priorities 0 (local), 32766 (main) and 32767 (default) are the kernel's own rules.
MIN_PRIORITY, MAX_PRIORITY = 1, 32765


@dataclass(frozen=True)
class ReturnPath:
    """One node's return path on one back end: replies from ``address`` go via ``gateway``."""

    node: str
    slot: int
    address: IPInterface  # on the back end, with the prefix length of its network
    gateway: IPAddress  # the node's back-end-facing address (in that network)
    table: int
    priority: int


@dataclass(frozen=True)
class BackendConfig:
    """A ``[[backend]]`` table: its paths in slot order."""

    name: str
    interface: str
    table_base: int
    rule_priority_base: int
    paths: tuple[ReturnPath, ...]

    @property
    def family(self) -> int:
        """4 or 6 (one back end's addresses are all of one family)."""
        return self.paths[0].address.version


def find_backend(backends: Sequence[BackendConfig], name: str, source: str) -> BackendConfig:
    """The back end called ``name`` (a ConfigError listing the configured ones otherwise)."""
    for b in backends:
        if b.name == name:
            return b
    known = ", ".join(repr(b.name) for b in backends) or "none configured"
    raise ConfigError(source, "backend", f"no back end named {name!r} (known: {known})")


def _gateways(
    source: str, raw_nodes: Sequence[Any], nodes: Sequence[NodeConfig]
) -> dict[str, tuple[tuple[str, IPAddress], ...]]:
    """Per node name: its ``backend_gateway`` addresses, each with its key path."""
    out: dict[str, tuple[tuple[str, IPAddress], ...]] = {}
    seen: dict[IPAddress, str] = {}
    for i, (item, node) in enumerate(zip(raw_nodes, nodes, strict=True)):
        key = f"node[{i}].backend_gateway"
        value = item.get("backend_gateway")
        if value is None:
            continue
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list) or not texts:
            raise ConfigError(
                source, key, f"expected an IP address or an array of them, got {value!r}"
            )
        found: list[tuple[str, IPAddress]] = []
        for j, text in enumerate(texts):
            k = key if isinstance(value, str) else f"{key}[{j}]"
            addr = _plain_address(source, k, text)
            if addr in seen:
                raise ConfigError(source, k, f"{addr} is already node {seen[addr]!r}'s gateway")
            seen[addr] = node.name
            found.append((k, addr))
        out[node.name] = tuple(found)
    return out


def _plain_address(source: str, key: str, text: Any) -> IPAddress:
    if not isinstance(text, str):
        raise ConfigError(source, key, f"expected an IP address string, got {text!r}")
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise ConfigError(source, key, f"{text!r} is not an IP address") from None
    if addr.is_multicast or addr.is_unspecified or addr.is_loopback:
        raise ConfigError(source, key, f"{addr} cannot be a gateway")
    return addr


def _interface_address(source: str, key: str, text: Any) -> IPInterface:
    if not isinstance(text, str):
        raise ConfigError(source, key, f"expected ADDRESS/PREFIXLEN, got {text!r}")
    if "/" not in text:
        raise ConfigError(source, key, f"{text!r} needs a prefix length (e.g. {text}/24)")
    try:
        iface = ipaddress.ip_interface(text)
    except ValueError:
        raise ConfigError(source, key, f"{text!r} is not ADDRESS/PREFIXLEN") from None
    a, net = iface.ip, iface.network
    if a.is_multicast or a.is_unspecified or a.is_loopback:
        raise ConfigError(source, key, f"{a} cannot be a back-end address")
    if net.num_addresses > 2 and a in (net.network_address, net.broadcast_address):
        what = "network" if a == net.network_address else "broadcast"
        if a.version == 4 or what == "network":
            raise ConfigError(source, key, f"{text} is the {what} address of {net}")
    return iface


def _backend(
    r: Reader,
    nodes: Sequence[NodeConfig],
    gateways: dict[str, tuple[tuple[str, IPAddress], ...]],
    node_keys: dict[str, str],
) -> BackendConfig:
    source = r.source
    name = r.get("name", str)
    if not NAME_RE.match(name):
        raise r.err("name", f"{name!r} must be 1-32 of A-Z a-z 0-9 _ . - (starting alnum)")
    interface = r.get("interface", str)
    if not 1 <= len(interface) <= 15 or "/" in interface or " " in interface:
        raise r.err("interface", f"{interface!r} is not a valid interface name")
    table_base = r.int_in("table_base", 1, MAX_TABLE, DEFAULT_TABLE_BASE)
    prio_base = r.int_in(
        "rule_priority_base", MIN_PRIORITY, MAX_PRIORITY, DEFAULT_RULE_PRIORITY_BASE
    )
    addresses = r.get("addresses", dict)
    by_name = {n.name: n for n in nodes}
    akey = r.key("addresses")
    for k in addresses:
        if k not in by_name:
            known = ", ".join(repr(n.name) for n in nodes)
            raise ConfigError(source, f"{akey}.{k}", f"unknown node {k!r} (nodes: {known})")
    paths: list[ReturnPath] = []
    for node in sorted(nodes, key=lambda n: n.slot):
        key = f"{akey}.{node.name}"
        if node.name not in addresses:
            raise ConfigError(
                source,
                akey,
                f"no address for node {node.name!r}: every node needs one address of its own "
                "on the back end (its replies are routed by it)",
            )
        iface = _interface_address(source, key, addresses[node.name])
        if paths and iface.version != paths[0].address.version:
            first = paths[0]
            raise ConfigError(
                source,
                key,
                f"{iface} is IPv{iface.version} but {akey}.{first.node} ({first.address}) is "
                f"IPv{first.address.version}: one back end's addresses are of one family "
                "(configure a second [[backend]] for the other)",
            )
        for p in paths:
            if p.address.ip == iface.ip:
                raise ConfigError(source, key, f"{iface.ip} is already node {p.node!r}'s address")
        candidates = [(k, g) for k, g in gateways.get(node.name, ()) if g in iface.network]
        if not candidates:
            have = ", ".join(str(g) for _, g in gateways.get(node.name, ())) or "none"
            raise ConfigError(
                source,
                key,
                f"{iface} is not in the same subnet as any backend_gateway of node "
                f"{node.name!r} ({node_keys[node.name]}.backend_gateway: {have}); the back end "
                f"must reach that node's gateway on {iface.network}",
            )
        if len(candidates) > 1:
            both = ", ".join(str(g) for _, g in candidates)
            raise ConfigError(
                source, key, f"{iface.network} holds several gateways of node {node.name!r}: {both}"
            )
        gkey, gateway = candidates[0]
        if gateway == iface.ip:
            raise ConfigError(
                source, key, f"{iface.ip} is node {node.name!r}'s own gateway ({gkey})"
            )
        table = table_base + node.slot
        if table in RESERVED_TABLES or table > MAX_TABLE:
            why = (
                f"the kernel's {RESERVED_TABLES[table]!r} table"
                if table in RESERVED_TABLES
                else f"above {MAX_TABLE}"
            )
            raise r.err(
                "table_base",
                f"{table_base} puts node {node.name!r} (slot {node.slot}) in table {table} "
                f"({why}); node in slot s uses table table_base + s",
            )
        priority = prio_base + node.slot
        if priority > MAX_PRIORITY:
            raise r.err(
                "rule_priority_base",
                f"{prio_base} gives node {node.name!r} (slot {node.slot}) rule priority "
                f"{priority}, above {MAX_PRIORITY} (32766 and 32767 are the main and default "
                "rules)",
            )
        paths.append(ReturnPath(node.name, node.slot, iface, gateway, table, priority))
    r.finish()
    return BackendConfig(name, interface, table_base, prio_base, tuple(paths))


def parse_backends(
    source: str,
    raw: Any,
    raw_nodes: Any,
    nodes: Sequence[NodeConfig],
    groups: Sequence[GroupConfig] = (),
) -> tuple[BackendConfig, ...]:
    """The ``[[backend]]`` tables (``raw``, None when absent) checked against the nodes
    (``raw_nodes``: their TOML tables, for ``backend_gateway``) and the traffic IPs."""
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise ConfigError(source, "backend", "expected an array of tables ([[backend]])")
    gateways = _gateways(source, raw_nodes, nodes)
    node_keys = {n.name: f"node[{i}]" for i, n in enumerate(nodes)}
    taken: dict[IPAddress, str] = {}
    for n in nodes:
        taken[n.address] = f"node {n.name!r}'s address"
    for g in groups:
        for a in g.addresses:
            taken[a] = f"a traffic IP of group {g.name!r}"
    for name, gws in gateways.items():
        for k, gw in gws:
            if gw in taken and not taken[gw].startswith(f"node {name!r}"):
                raise ConfigError(source, k, f"{gw} is {taken[gw]}")
            taken.setdefault(gw, f"node {name!r}'s gateway ({k})")
    out: list[BackendConfig] = []
    for i, item in enumerate(raw):
        path = f"backend[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(source, path, "expected a table")
        r = Reader(source, item, path)
        b = _backend(r, nodes, gateways, node_keys)
        if any(prev.name == b.name for prev in out):
            raise r.err("name", f"back end {b.name!r} is defined twice")
        for p in b.paths:
            key = f"{path}.addresses.{p.node}"
            if p.address.ip in taken:
                raise ConfigError(source, key, f"{p.address.ip} is already {taken[p.address.ip]}")
            taken[p.address.ip] = f"back end {b.name!r}'s address for node {p.node!r}"
        out.append(b)
    return tuple(out)
