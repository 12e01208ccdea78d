"""IP transparency in the configuration: transparent groups, return groups, ``[transparency]``.

With IP transparency the nodes proxy (or forward) a client's connection to a back end with
the client's own address as source, so the back end's reply is addressed to the client and
must reach the node that holds the connection (``docs/transparency.md``).  Two ways:

* ``return = "routes"``: each back end routes replies by the per-node address the
  connection came to (``[[backend]]``, :mod:`multihost.backends`, ``backend-routes``);
* ``return = "gateway"``: the back ends' default gateway is a *return group*, a
  ``[[traffic_ip_group]]`` with ``return_for = "<front group>"``, hosted by the same members
  on the back-end-facing ``interface``, whose replies every node receives (cluster MAC) and
  each node keeps only for the buckets it owns: the return group hashes the reply's
  destination (the client) where the front group hashes the request's source
  (:data:`multihost.flowhash.RETURN_MODES`), with the same seed and table, and shares the
  front group's bucket states in both data planes, so a reply lands on the node that owns
  its request, through handovers and failures alike.

Owns: the schema of ``transparent``/``return`` (front group), of a return group
(``return_for``, ``addresses``, ``interface``, optional ``members``/``hash`` that must equal
what the front group implies) and of ``[transparency]`` (the nodes' socket mark, routing
table and rule priority for replies to non-local client addresses), and the refusal of
every combination that cannot be symmetric, one :class:`~multihost.config.ConfigError`
naming the key each.

Must not: touch the network, the kernel or files (pure: TOML values in, frozen dataclasses
out).  The host plumbing is :mod:`multihost.dataplane.hostsetup`'s, the filters are
:mod:`multihost.dataplane.rulesettables`' and the XDP program's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from multihost.config_fields import Reader, interface_name_problem, read_address
from multihost.config_model import GROUP_RE, ConfigError, GroupConfig, IPAddress, NodeConfig
from multihost.flowhash import RETURN_MODES, HashMode

#: ``return`` of a transparent group.
RETURN_WAYS = ("routes", "gateway")
#: Defaults of ``[transparency]`` ("MH" = 0x4d48): mark of packets that belong to a
#: transparent socket, the routing table holding ``local default dev lo``, its rule.
DEFAULT_FWMARK = 0x4D48
DEFAULT_TABLE = 4248
DEFAULT_RULE_PRIORITY = 4248
#: Keys a return group cannot have: it shares the front group's seed and table.
_SHARED = {
    "hash_seed": "the cluster's hash_seed (cluster.hash_seed), as its front group",
    "seed": "the cluster's hash_seed (cluster.hash_seed), as its front group",
    "table": "the cluster's table (chosen by slot count), as its front group",
    "transparent": "its front group's transparency settings",
    "return": "nothing: it is the return path itself",
}


@dataclass(frozen=True)
class ReturnGroupConfig:
    """A return group: the back ends' gateway, hosted like (and sharing the bucket states
    of) group ``front``; replies to clients arrive on ``interface`` with the cluster MAC."""

    name: str
    front: str
    addresses: tuple[IPAddress, ...]
    interface: str
    members: tuple[str, ...]
    hash: HashMode  # RETURN_MODES[front group's hash]


@dataclass(frozen=True)
class TransparencyConfig:
    """``[transparency]``: how a node delivers replies for non-local client addresses to
    its transparent sockets (``socket transparent`` -> mark -> rule -> ``local`` route)."""

    fwmark: int = DEFAULT_FWMARK
    table: int = DEFAULT_TABLE
    rule_priority: int = DEFAULT_RULE_PRIORITY


def is_return_item(item: Any) -> bool:
    """Whether a ``[[traffic_ip_group]]`` table is a return group (has ``return_for``)."""
    return isinstance(item, dict) and "return_for" in item


def front_keys(r: Reader, mode: HashMode) -> tuple[bool, str]:
    """``transparent`` and ``return`` of a (front) group's table: (transparent, way)."""
    if mode in RETURN_MODES.values():
        raise r.err(
            "hash",
            f'"{mode.value}" hashes the destination of a reply: it is the hash of a return '
            'group (return_for = "<group>"), which follows its front group by itself; a '
            f'front group uses "{_front_of(mode).value}"',
        )
    transparent = r.get("transparent", bool, False)
    way = r.get("return", str, None)
    if way is None:
        return transparent, "routes" if transparent else ""
    if way not in RETURN_WAYS:
        raise r.err("return", f"{way!r} is not one of " + ", ".join(f'"{w}"' for w in RETURN_WAYS))
    if not transparent:
        raise r.err(
            "return",
            f'"{way}" is the return path of a transparent group: set transparent = true '
            "(without transparency the back ends reply to the node itself)",
        )
    if way == "gateway" and mode not in RETURN_MODES:
        raise r.err(
            "hash",
            f'"{mode.value}" cannot be symmetric with return = "gateway": it hashes the '
            "traffic IP or its port, which a back end's reply to the client does not carry; "
            'use "source-ip-port" (the proxy connects from the client\'s address and port: '
            'HAProxy "source 0.0.0.0 usesrc client") or "source-ip" (client address only: '
            'nginx "proxy_bind $remote_addr transparent")',
        )
    return transparent, way


def _front_of(mode: HashMode) -> HashMode:
    return next(f for f, r in RETURN_MODES.items() if r is mode)


def parse_returns(
    source: str,
    raw_groups: Sequence[Any],
    cluster_interface: str,
    nodes: Sequence[NodeConfig],
    groups: Sequence[GroupConfig],
) -> tuple[ReturnGroupConfig, ...]:
    """The return groups among ``raw_groups`` (the ``[[traffic_ip_group]]`` tables, indexed
    as in the file), checked against the front ``groups`` already parsed."""
    by_name = {g.name: g for g in groups}
    taken: dict[IPAddress, str] = {n.address: f"node {n.name!r}'s own address" for n in nodes}
    for g in groups:
        for a in g.addresses:
            taken[a] = f"already in group {g.name!r}"
    out: list[ReturnGroupConfig] = []
    carried: dict[tuple[str, int], str] = {}  # (interface, family) -> return group
    for i, item in enumerate(raw_groups):
        if not is_return_item(item):
            continue
        path = f"traffic_ip_group[{i}]"
        r = Reader(source, item, path)
        for key, what in _SHARED.items():
            if key in item:
                raise r.err(key, f"a return group uses {what}: remove this key")
        name = r.get("name", str)
        if not GROUP_RE.match(name):
            raise r.err("name", f"{name!r} must be 1-24 of A-Z a-z 0-9 _ - (starting alnum)")
        if name in by_name or any(x.name == name for x in out):
            raise r.err("name", f"group {name!r} is defined twice")
        front_name = r.get("return_for", str)
        front = by_name.get(front_name)
        if front is None:
            known = ", ".join(repr(g.name) for g in groups)
            why = "is a return group itself" if any(x.name == front_name for x in out) else ""
            raise r.err(
                "return_for",
                f"group {front_name!r} {why or 'is not a front group'} (front groups: {known})",
            )
        if not front.transparent or front.return_way != "gateway":
            raise r.err(
                "return_for",
                f'group {front_name!r} must set transparent = true and return = "gateway" to '
                "have a return group",
            )
        addrs = _addresses(r, path, taken, name)
        interface = r.get("interface", str, cluster_interface)
        problem = interface_name_problem(interface)
        if problem:
            raise r.err("interface", problem)
        for a in addrs:
            other = carried.get((interface, a.version))
            if other is not None:
                raise r.err(
                    "interface",
                    f"{interface!r} already carries return group {other!r}'s IPv{a.version} "
                    "replies: one return group per interface and family (replies are told "
                    "apart by interface and cluster MAC only)",
                )
        for a in addrs:
            carried[(interface, a.version)] = name
        members = r.get("members", list, list(front.members))
        if sorted(members) != sorted(front.members) or len(set(members)) != len(members):
            raise r.err(
                "members",
                f"{members!r} are not group {front_name!r}'s members {list(front.members)!r}: "
                "a return group is hosted by exactly its front group's members (omit the key "
                "to inherit them)",
            )
        mode = RETURN_MODES[front.hash]  # front_keys refused the rest
        text = r.get("hash", str, mode.value)
        if text != mode.value:
            raise r.err(
                "hash",
                f'"{text}" is not the return mode of group {front_name!r}\'s "{front.hash.value}"'
                f': its replies land in the request\'s bucket only with "{mode.value}" (omit '
                "the key to inherit it)",
            )
        r.finish()
        out.append(ReturnGroupConfig(name, front_name, addrs, interface, tuple(members), mode))
    for g in groups:
        if g.return_way == "gateway" and not any(x.front == g.name for x in out):
            i = _index_of(raw_groups, g.name)
            raise ConfigError(
                source,
                f"traffic_ip_group[{i}].return",
                f'"gateway" needs a return group: a [[traffic_ip_group]] with return_for = '
                f'"{g.name}" holding the back ends\' default gateway address',
            )
    return tuple(out)


def _addresses(
    r: Reader, path: str, taken: dict[IPAddress, str], name: str
) -> tuple[IPAddress, ...]:
    addr_list = r.get("addresses", list)
    if not addr_list:
        raise r.err("addresses", "needs the back ends' gateway address (one per family)")
    out: list[IPAddress] = []
    for j, text in enumerate(addr_list):
        key = f"{path}.addresses[{j}]"
        a = read_address(r, key, text)
        if a.is_multicast or a.is_unspecified or a.is_loopback:
            raise ConfigError(r.source, key, f"{a} cannot be a gateway address")
        if a in taken:
            raise ConfigError(r.source, key, f"{a} is {taken[a]}")
        taken[a] = f"already in group {name!r}"
        out.append(a)
    return tuple(out)


def _index_of(raw_groups: Sequence[Any], name: str) -> int:
    return next(
        i
        for i, item in enumerate(raw_groups)
        if isinstance(item, dict) and item.get("name") == name and not is_return_item(item)
    )


def routes_need_backends(
    source: str, raw_groups: Sequence[Any], groups: Sequence[GroupConfig], backends: int
) -> None:
    """``return = "routes"`` routes replies by the per-node addresses of ``[[backend]]``."""
    if backends:
        return
    for g in groups:
        if g.transparent and g.return_way == "routes":
            raise ConfigError(
                source,
                f"traffic_ip_group[{_index_of(raw_groups, g.name)}].return",
                '"routes" (the default of a transparent group) needs the back ends in '
                "[[backend]] tables (one address per node on each, its replies routed by it: "
                'multihost backend-routes); or use return = "gateway" with a return group',
            )


_MAX_TABLE = 0xFFFFFFFF
_RESERVED_TABLES = {0, 253, 254, 255}


def parse_transparency(source: str, raw: Any) -> TransparencyConfig:
    """The ``[transparency]`` table (None: the defaults)."""
    if raw is None:
        return TransparencyConfig()
    if not isinstance(raw, Mapping):
        raise ConfigError(source, "transparency", "expected a table ([transparency])")
    r = Reader(source, raw, "transparency")
    mark = r.int_in("fwmark", 1, _MAX_TABLE, DEFAULT_FWMARK)
    table = r.int_in("table", 1, _MAX_TABLE, DEFAULT_TABLE)
    if table in _RESERVED_TABLES:
        raise r.err("table", f"{table} is one of the kernel's tables (253-255); choose another")
    prio = r.int_in("rule_priority", 1, 32765, DEFAULT_RULE_PRIORITY)
    r.finish()
    return TransparencyConfig(mark, table, prio)
