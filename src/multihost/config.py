"""Cluster configuration: one TOML file, the same on every node -> frozen dataclasses.

Owns: the schema (``[cluster]``, ``[[node]]``, ``[[traffic_ip_group]]``), defaults,
validation, the digest of the ownership-relevant part (carried in heartbeats so members with
different configurations never share buckets), and finding this node's entry.  Every error
names the file, the key path and the reason, e.g.
``/etc/multihost.toml: traffic_ip_group[0].members[2]: unknown node 'E'``.

Must not: touch the network or the kernel.  :func:`parse_config` is pure; :func:`load_config`
only reads the file (and, when asked, checks the key file's permissions and reads it).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import stat
import tomllib
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from multihost.assignment import PreferenceTable
from multihost.flowhash import HashMode
from multihost.tablechoice import TABLE_KINDS, cluster_table, table_identity, table_size_slots

if TYPE_CHECKING:
    from multihost.backends import BackendConfig
    from multihost.transparency import ReturnGroupConfig, TransparencyConfig

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
GROUP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,23}$")
MIN_KEY_BYTES = 16
# Default dead_after: two intervals (one lost heartbeat) plus this much lateness (at least;
# a quarter interval above 120 ms intervals).
DEAD_AFTER_SLACK_MS = 30


def default_dead_after_ms(interval_ms: int) -> int:
    return 2 * interval_ms + max(DEAD_AFTER_SLACK_MS, interval_ms // 4)


# Node slots (heartbeat mask bits, table slots): the wire format (version 2) carries 16.
MAX_SLOTS = 16
# A node of weight k holds k virtual slots of the table; a table has at most 16 slots.
MAX_TABLE_SLOTS = 16

METRICS_RE = re.compile(r"^(\[[0-9a-fA-F:]+\]|[0-9.]+|localhost):\d+$")


class ConfigError(ValueError):
    """A configuration problem: ``path: key: reason``."""

    def __init__(self, source: str, key: str, reason: str) -> None:
        self.source, self.key, self.reason = source, key, reason
        super().__init__(f"{source}: {key}: {reason}" if key else f"{source}: {reason}")


@dataclass(frozen=True)
class ClusterConfig:
    name: str
    interface: str
    multicast_group: IPAddress  # heartbeats; IPv4 (239.192.0.0/14) or IPv6 (ff15::/16)
    port: int
    key_file: Path
    hash_seed: int
    heartbeat_interval_ms: int = 100
    dead_after_ms: int = 2 * 100 + DEAD_AFTER_SLACK_MS
    quorum: bool = False
    takeover_hold_ms: int = 0
    lease_margin_ms: int = 10  # default: interval / 10 within 5..50
    heartbeat_jitter_ms: int = 5  # default: min(5, interval / 4)
    realtime_priority: int = 10  # SCHED_RR priority of the agent; 0 = normal scheduling
    max_drain_ms: int = 60_000
    control_socket: Path = Path("/run/multihost/control.sock")
    metrics_address: str | None = None  # "HOST:PORT"; None = off
    dataplane: str = "auto"  # "auto" | "xdp" | "nft" (see multihost.dataplane.backend)
    xdp_mode: str = "auto"  # "auto" (native, else generic) | "native" | "generic"
    table: str = "factorial"  # "factorial" | "minimal" (see multihost.tablechoice)
    bpf_pin_root: Path = Path("/sys/fs/bpf/multihost")  # on a BPF filesystem
    # The other family's group, for the MAC of that family's traffic IPs (dual stack):
    multicast_group4: ipaddress.IPv4Address | None = None  # with an IPv6 multicast_group
    multicast_group6: ipaddress.IPv6Address | None = None  # with an IPv4 multicast_group

    @property
    def arp_group(self) -> ipaddress.IPv4Address | None:
        """The IPv4 group whose MAC (``01:00:5e`` + low 23 bits) answers ARP, if any."""
        g = self.multicast_group
        return g if isinstance(g, ipaddress.IPv4Address) else self.multicast_group4

    @property
    def ndp_group(self) -> ipaddress.IPv6Address | None:
        """The IPv6 group whose MAC (``33:33`` + low 32 bits) answers NDP, if any."""
        g = self.multicast_group
        return g if isinstance(g, ipaddress.IPv6Address) else self.multicast_group6

    @property
    def groups(self) -> tuple[IPAddress, ...]:
        """Every cluster multicast group the interface joins (heartbeat group first)."""
        other = self.multicast_group6 or self.multicast_group4
        return (self.multicast_group,) if other is None else (self.multicast_group, other)


@dataclass(frozen=True)
class ConfigWarning:
    """A configuration that is valid but works badly: ``path: key: reason``."""

    source: str
    key: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.key}: {self.reason}"


def timing_warnings(source: str, c: ClusterConfig) -> list[ConfigWarning]:
    """What the timing keys of a valid configuration cost (``docs/membership.md``, "Timing
    rules"): leases that lapse between late heartbeats (a crash then pauses the survivors'
    new flows), and a dead_after that declares live members dead after one late loss."""
    i, j = c.heartbeat_interval_ms, c.heartbeat_jitter_ms
    window = c.dead_after_ms + c.takeover_hold_ms - c.lease_margin_ms
    out = []
    need = 2 * i + 3 * j
    if window <= need:
        out.append(
            ConfigWarning(
                source,
                "cluster.dead_after_ms",
                f"{c.dead_after_ms} ms is too close to 2 x heartbeat_interval_ms for "
                f"heartbeat_jitter_ms {j}: leases (dead_after_ms + takeover_hold_ms - "
                f"lease_margin_ms = {window} ms) lapse when heartbeats are late, and a crash "
                "pauses the survivors' new flows; use dead_after_ms >= "
                f"{need + c.lease_margin_ms - c.takeover_hold_ms + 1}",
            )
        )
    slack = c.dead_after_ms - 2 * i
    if slack < 3 * j:
        out.append(
            ConfigWarning(
                source,
                "cluster.dead_after_ms",
                f"{c.dead_after_ms} ms leaves {slack} ms beyond two heartbeats, less than 3 x "
                f"heartbeat_jitter_ms ({3 * j}): one lost heartbeat followed by a late one "
                "declares a live member dead (a false failover)",
            )
        )
    return out


@dataclass(frozen=True)
class NodeConfig:
    name: str
    address: IPAddress
    slot: int
    weight: int = 1  # virtual slots of the table it holds (multihost.weighted)


@dataclass(frozen=True)
class GroupConfig:
    name: str
    addresses: tuple[IPAddress, ...]
    members: tuple[str, ...]
    hash: HashMode = HashMode.FOUR_TUPLE
    transparent: bool = False  # the nodes proxy with the client's address (transparency)
    return_way: str = ""  # transparent: "routes" ([[backend]]) or "gateway" (a return group)


@dataclass(frozen=True)
class Config:
    source: str
    cluster: ClusterConfig
    nodes: tuple[NodeConfig, ...]
    groups: tuple[GroupConfig, ...]
    backends: tuple[BackendConfig, ...] = ()  # [[backend]]: multihost.backends
    # return groups ([[traffic_ip_group]] with return_for) and [transparency]: not in
    # ``groups`` -- they own no buckets, they share their front group's (transparency.py)
    returns: tuple[ReturnGroupConfig, ...] = ()
    transparency: TransparencyConfig | None = None

    def front_of(self, ret: ReturnGroupConfig) -> GroupConfig:
        return next(g for g in self.groups if g.name == ret.front)

    @property
    def weights(self) -> tuple[tuple[int, int], ...]:
        """``(slot, weight)`` of every node, by slot."""
        return tuple(sorted((n.slot, n.weight) for n in self.nodes))

    @property
    def weighted(self) -> bool:
        return any(n.weight != 1 for n in self.nodes)

    @property
    def table_slots(self) -> int:
        """Slots the cluster's table is chosen by: the highest configured slot + 1, or with
        weights the sum of the weights (virtual slots)."""
        return table_size_slots(self.weights)

    @property
    def table(self) -> PreferenceTable:
        """The preference table of every group (:mod:`multihost.tablechoice`)."""
        return cluster_table(self.weights, self.cluster.table)

    @property
    def buckets(self) -> int:
        return self.table.buckets

    def node(self, name: str) -> NodeConfig:
        for n in self.nodes:
            if n.name == name:
                return n
        raise ConfigError(self.source, "node", f"no node named {name!r}")

    @property
    def slots(self) -> dict[str, int]:
        return {n.name: n.slot for n in self.nodes}

    @property
    def uses_ipv6(self) -> bool:
        """Whether the cluster interface carries IPv6 for the agent: IPv6 heartbeats or an
        IPv6 traffic IP (then the link is ready only once DAD has finished: linkwatch.py)."""
        return self.cluster.multicast_group.version == 6 or any(
            a.version == 6 for g in self.groups for a in g.addresses
        )

    def digest(self) -> bytes:
        """16-byte digest of everything that decides bucket ownership."""
        canon = {
            "table": table_identity(self.table).as_dict(),
            "seed": self.cluster.hash_seed,
            "nodes": sorted((n.name, n.slot) for n in self.nodes),
            "groups": sorted(
                (g.name, sorted(str(a) for a in g.addresses), sorted(g.members), g.hash.value)
                for g in self.groups
            ),
        }
        if self.returns:  # replies follow these: every node must hash them alike
            canon["returns"] = sorted(
                (r.name, r.front, sorted(str(a) for a in r.addresses), r.hash.value)
                for r in self.returns
            )
        blob = json.dumps(canon, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).digest()[:16]

    def find_local_node(self, local_addresses: Sequence[IPAddress]) -> NodeConfig:
        """The node whose ``address`` is one of this host's addresses (exactly one)."""
        mine = [n for n in self.nodes if n.address in set(local_addresses)]
        if len(mine) != 1:
            found = ", ".join(n.name for n in mine) or "none"
            raise ConfigError(
                self.source,
                "node",
                f"cannot tell which node this host is (matches: {found}); pass --node NAME",
            )
        return mine[0]


class _Reader:
    """Typed access to a TOML table that reports errors with the full key path."""

    def __init__(self, source: str, table: Mapping[str, Any], path: str) -> None:
        self.source, self.table, self.path = source, table, path
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def err(self, name: str, reason: str) -> ConfigError:
        return ConfigError(self.source, self.key(name), reason)

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        self.used.add(name)
        if name not in self.table:
            if default is ...:
                raise self.err(name, "is required")
            return default
        value = self.table[name]
        if isinstance(value, bool) and kind is not bool and bool not in _tuple(kind):
            raise self.err(name, f"expected {_kind_name(kind)}, got a boolean")
        if not isinstance(value, kind):
            raise self.err(name, f"expected {_kind_name(kind)}, got {type(value).__name__}")
        return value

    def int_in(self, name: str, lo: int, hi: int, default: Any = ...) -> int:
        value: int = self.get(name, int, default)
        if not lo <= value <= hi:
            raise self.err(name, f"{value} is outside {lo}..{hi}")
        return value

    def finish(self) -> None:
        for k in self.table:
            if k not in self.used:
                raise ConfigError(self.source, self.key(k), "unknown key")


def _tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {
        int: "an integer",
        str: "a string",
        bool: "a boolean",
        list: "an array",
        dict: "a table",
    }
    return " or ".join(names.get(k, k.__name__) for k in _tuple(kind))


def _address(r: _Reader, key: str, text: Any) -> IPAddress:
    if not isinstance(text, str):
        raise ConfigError(r.source, key, f"expected an IP address string, got {text!r}")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ConfigError(r.source, key, f"{text!r} is not an IP address") from None


#: Multicast groups a cluster may use: organisation-local IPv4 (RFC 2365) and transient IPv6
#: groups of link, admin, site or organisation scope (RFC 4291 2.7: flags 1, scope 2..8).
_V6_SCOPES = {2: "link", 4: "admin", 5: "site", 8: "organisation"}


def _mcast_group(r: _Reader, key: str, text: str) -> IPAddress:
    try:
        group = ipaddress.ip_address(text)
    except ValueError:
        raise r.err(key, f"{text!r} is not an IP address") from None
    if isinstance(group, ipaddress.IPv4Address):
        if not group.is_multicast:
            raise r.err(key, f"{group} is not a multicast address (224.0.0.0/4)")
        if group in ipaddress.IPv4Network("224.0.0.0/24"):
            raise r.err(key, f"{group} is link-local control; use 239.192.0.0/14")
        return group
    if not group.is_multicast:
        raise r.err(key, f"{group} is not a multicast address (ff00::/8)")
    flags, scope = group.packed[1] >> 4, group.packed[1] & 0xF
    if flags & 1 == 0:
        raise r.err(
            key, f"{group} is a permanent, well-known group; use a transient one (ff15::/16)"
        )
    if scope not in _V6_SCOPES:
        raise r.err(
            key,
            f"{group} has scope {scope:x}; use link (2), admin (4), site (5) or organisation (8)"
            " scope, e.g. ff15::/16",
        )
    return group


def _dual_stack(source: str, cluster: ClusterConfig, groups: tuple[GroupConfig, ...]) -> None:
    """Each family of traffic IP needs a group of that family for its multicast MAC."""
    for g in groups:
        for a in g.addresses:
            if a.version == 4 and cluster.arp_group is None:
                raise ConfigError(
                    source,
                    "cluster.multicast_group4",
                    f"is required for the IPv4 traffic IP {a} (group {g.name!r}): ARP answers"
                    " carry 01:00:5e + the low 23 bits of an IPv4 group, e.g. 239.192.0.1",
                )
            if a.version == 6 and cluster.ndp_group is None:
                raise ConfigError(
                    source,
                    "cluster.multicast_group6",
                    f"is required for the IPv6 traffic IP {a} (group {g.name!r}): NDP answers"
                    " carry 33:33 + the low 32 bits of an IPv6 group, e.g. ff15::1",
                )


def _seed(r: _Reader, name: str, cluster_name: str) -> int:
    value = r.get(name, (int, str), None)
    if value is None:
        return zlib.crc32(cluster_name.encode())
    if isinstance(value, str):
        try:
            value = int(value, 0)
        except ValueError:
            raise r.err(name, f"{value!r} is not an integer (e.g. 0x5eed1234)") from None
    if not 0 <= value <= 0xFFFFFFFF:
        raise r.err(name, f"{value} is not a 32-bit value")
    return int(value)


DATAPLANES = ("auto", "xdp", "nft")
XDP_MODES = ("auto", "native", "generic")


def interface_name_problem(name: str) -> str | None:
    if not 1 <= len(name) <= 15 or "/" in name or " " in name:
        return f"{name!r} is not a valid interface name"
    return None


def _choice(r: _Reader, name: str, choices: tuple[str, ...], default: str) -> str:
    value = r.get(name, str, default)
    if value not in choices:
        raise r.err(name, f"{value!r} is not one of {', '.join(repr(c) for c in choices)}")
    return str(value)


def _cluster(source: str, raw: Any) -> ClusterConfig:
    if not isinstance(raw, dict):
        raise ConfigError(source, "cluster", "a [cluster] table is required")
    r = _Reader(source, raw, "cluster")
    name = r.get("name", str)
    if not NAME_RE.match(name):
        raise r.err("name", f"{name!r} must be 1-32 of A-Z a-z 0-9 _ . - (starting alnum)")
    interface = r.get("interface", str)
    if problem := interface_name_problem(interface):
        raise r.err("interface", problem)
    group = _mcast_group(r, "multicast_group", r.get("multicast_group", str))
    other: dict[int, IPAddress] = {}
    for family in (4, 6):
        key = f"multicast_group{family}"
        text = r.get(key, str, None)
        if text is None:
            continue
        g = _mcast_group(r, key, text)
        if g.version != family:
            raise r.err(key, f"{g} is not an IPv{family} multicast group")
        if group.version == family:
            raise r.err(
                key,
                f"multicast_group {group} is already IPv{family}: {key} names the IPv{family}"
                f" group only when heartbeats use IPv{10 - family}",
            )
        other[family] = g
    port = r.int_in("port", 1, 65535, 7946)
    interval = r.int_in("heartbeat_interval_ms", 5, 10_000, 100)
    # Default: one lost heartbeat plus DEAD_AFTER_SLACK_MS of lateness (VRRP's master-down
    # interval is 3 x advert_int + skew); see docs/membership.md, "Timing rules".
    dead_after = r.int_in("dead_after_ms", 1, 600_000, default_dead_after_ms(interval))
    if dead_after < 2 * interval:
        raise r.err(
            "dead_after_ms", f"{dead_after} must be at least 2 x heartbeat_interval_ms ({interval})"
        )
    hold = r.int_in("takeover_hold_ms", 0, 60_000, 0)
    jitter = r.int_in("heartbeat_jitter_ms", 0, interval - 1, min(5, interval // 4))
    margin = r.int_in("lease_margin_ms", 1, 60_000, min(50, max(5, interval // 10)))
    window = dead_after + hold - 2 * interval
    if margin >= window:
        raise r.err(
            "lease_margin_ms",
            f"{margin} ms cannot hold: a lease lasts dead_after_ms + takeover_hold_ms - "
            f"lease_margin_ms after the acked heartbeat was sent, and acks come up to 2 x "
            f"heartbeat_interval_ms ({2 * interval} ms) apart, so every lease would lapse; "
            f"use lease_margin_ms < {window} or raise dead_after_ms",
        )
    metrics = r.get("metrics_address", str, None)
    if metrics is not None and not re.match(
        r"^(\[[0-9a-fA-F:]+\]|[0-9.]+|localhost):\d+$", metrics
    ):
        raise r.err("metrics_address", f"{metrics!r} is not HOST:PORT (e.g. 127.0.0.1:9650)")
    cfg = ClusterConfig(
        name=name,
        interface=interface,
        multicast_group=group,
        port=port,
        key_file=Path(r.get("key_file", str)),
        hash_seed=_seed(r, "hash_seed", name),
        heartbeat_interval_ms=interval,
        dead_after_ms=dead_after,
        quorum=r.get("quorum", bool, False),
        takeover_hold_ms=hold,
        lease_margin_ms=margin,
        heartbeat_jitter_ms=jitter,
        realtime_priority=r.int_in("realtime_priority", 0, 99, 10),
        max_drain_ms=r.int_in("max_drain_ms", 0, 86_400_000, 60_000),
        control_socket=Path(r.get("control_socket", str, "/run/multihost/control.sock")),
        metrics_address=metrics,
        dataplane=_choice(r, "dataplane", DATAPLANES, "auto"),
        xdp_mode=_choice(r, "xdp_mode", XDP_MODES, "auto"),
        table=_choice(r, "table", TABLE_KINDS, "factorial"),
        bpf_pin_root=Path(r.get("bpf_pin_root", str, "/sys/fs/bpf/multihost")),
        multicast_group4=g4 if isinstance(g4 := other.get(4), ipaddress.IPv4Address) else None,
        multicast_group6=g6 if isinstance(g6 := other.get(6), ipaddress.IPv6Address) else None,
    )
    if not cfg.bpf_pin_root.is_absolute():
        raise r.err("bpf_pin_root", f"{str(cfg.bpf_pin_root)!r} must be an absolute path")
    r.finish()
    return cfg


def _nodes(source: str, raw: Any) -> tuple[NodeConfig, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(source, "node", "at least one [[node]] table is required")
    out: list[NodeConfig] = []
    for i, item in enumerate(raw):
        path = f"node[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(source, path, "expected a table")
        r = _Reader(source, item, path)
        name = r.get("name", str)
        if not NAME_RE.match(name):
            raise r.err("name", f"{name!r} must be 1-32 of A-Z a-z 0-9 _ . - (starting alnum)")
        address = _address(r, r.key("address"), r.get("address", str))
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
            raise r.err(
                "address",
                f"{address}: write a link-local address without %zone (it is scoped to"
                " cluster.interface)",
            )
        slot = r.int_in("slot", 0, MAX_SLOTS - 1)
        weight: int = r.get("weight", int, 1)
        if not 1 <= weight <= MAX_TABLE_SLOTS:
            raise r.err(
                "weight",
                f"{weight} is outside 1..{MAX_TABLE_SLOTS}: a node of weight k holds k of the"
                f" table's at most {MAX_TABLE_SLOTS} slots (default 1)",
            )
        r.used.add("backend_gateway")  # parsed with [[backend]] by multihost.backends
        r.finish()
        for prev in out:
            if prev.name == name:
                raise r.err("name", f"node {name!r} is defined twice")
            if prev.slot == slot:
                raise r.err("slot", f"slot {slot} is already node {prev.name!r}'s")
            if prev.address == address:
                raise r.err("address", f"{address} is already node {prev.name!r}'s")
        out.append(NodeConfig(name, address, slot, weight))
    total = sum(n.weight for n in out)
    if total > MAX_TABLE_SLOTS:
        i = next(
            i for i in range(len(out)) if sum(n.weight for n in out[: i + 1]) > MAX_TABLE_SLOTS
        )
        raise ConfigError(
            source,
            f"node[{i}].weight",
            f"the weights of all nodes add up to {total} ("
            + ", ".join(f"{n.name}={n.weight}" for n in out)
            + f"); the cluster table (every group's) holds at most {MAX_TABLE_SLOTS} slots",
        )
    return tuple(out)


def _groups(source: str, raw: Any, nodes: tuple[NodeConfig, ...]) -> tuple[GroupConfig, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(
            source, "traffic_ip_group", "at least one [[traffic_ip_group]] is required"
        )
    names = {n.name for n in nodes}
    node_addrs = {n.address: n.name for n in nodes}
    seen_addr: dict[IPAddress, str] = {}
    out: list[GroupConfig] = []
    from multihost.transparency import front_keys, is_return_item

    for i, item in enumerate(raw):
        path = f"traffic_ip_group[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(source, path, "expected a table")
        if is_return_item(item):
            continue  # a return group: multihost.transparency.parse_returns
        r = _Reader(source, item, path)
        name = r.get("name", str)
        if not GROUP_RE.match(name):
            raise r.err("name", f"{name!r} must be 1-24 of A-Z a-z 0-9 _ - (starting alnum)")
        if any(g.name == name for g in out):
            raise r.err("name", f"group {name!r} is defined twice")
        addr_list = r.get("addresses", list)
        if not addr_list:
            raise r.err("addresses", "needs at least one traffic IP")
        addrs: list[IPAddress] = []
        for j, text in enumerate(addr_list):
            key = f"{path}.addresses[{j}]"
            a = _address(r, key, text)
            if a.is_multicast or a.is_unspecified or a.is_loopback:
                raise ConfigError(source, key, f"{a} cannot be a traffic IP")
            if a in node_addrs:
                raise ConfigError(source, key, f"{a} is node {node_addrs[a]!r}'s own address")
            if a in seen_addr:
                raise ConfigError(source, key, f"{a} is already in group {seen_addr[a]!r}")
            seen_addr[a] = name
            addrs.append(a)
        members = r.get("members", list)
        if not members:
            raise r.err("members", "needs at least one member")
        if len(members) > MAX_SLOTS:
            raise r.err("members", f"{len(members)} members, at most {MAX_SLOTS}")

        for j, m in enumerate(members):
            key = f"{path}.members[{j}]"
            if not isinstance(m, str) or m not in names:
                raise ConfigError(source, key, f"unknown node {m!r}")
            if members.index(m) != j:
                raise ConfigError(source, key, f"node {m!r} is listed twice")
        mode_text = r.get("hash", str, HashMode.FOUR_TUPLE.value)
        try:
            mode = HashMode(mode_text)
        except ValueError:
            choices = ", ".join(f'"{m.value}"' for m in HashMode)
            raise r.err("hash", f"{mode_text!r} is not one of {choices}") from None
        transparent, way = front_keys(r, mode)
        r.finish()
        out.append(GroupConfig(name, tuple(addrs), tuple(members), mode, transparent, way))
    if not out:
        raise ConfigError(
            source, "traffic_ip_group", "at least one [[traffic_ip_group]] without return_for"
        )
    return tuple(out)


def parse_config(text: str, source: str = "<config>") -> Config:
    """Parse and validate TOML text.  Pure: raises :class:`ConfigError` on any problem."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, "", f"not valid TOML: {e}") from None
    top = _Reader(source, raw, "")
    cluster = _cluster(source, top.get("cluster", dict, None))
    nodes = _nodes(source, top.get("node", list, None))
    raw_groups = top.get("traffic_ip_group", list, None)
    groups = _groups(source, raw_groups, nodes)
    from multihost import transparency as tp  # these import this module
    from multihost.backends import parse_backends

    returns = tp.parse_returns(source, raw_groups, cluster.interface, nodes, groups)
    all_ips = [*groups, *(GroupConfig(g.name, g.addresses, g.members, g.hash) for g in returns)]
    backends = parse_backends(source, top.get("backend", list, None), raw["node"], nodes, all_ips)
    tp.routes_need_backends(source, raw_groups, groups, len(backends))
    transparency = tp.parse_transparency(source, top.get("transparency", dict, None))
    top.finish()
    _dual_stack(source, cluster, tuple(all_ips))
    return Config(
        source,
        cluster,
        nodes,
        groups,
        backends=backends,
        returns=returns,
        transparency=transparency,
    )


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a configuration file (does not read the key)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(str(p), "", f"cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(str(p), "", "is not UTF-8 text") from None
    return parse_config(text, str(p))


def read_key(cfg: Config) -> bytes:
    """The shared secret from ``cluster.key_file``; refuses world-readable or short keys."""
    path = cfg.cluster.key_file
    if not path.is_absolute():
        path = Path(cfg.source).parent / path
    key = "cluster.key_file"
    try:
        st = path.stat()
    except OSError as e:
        raise ConfigError(cfg.source, key, f"{path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(cfg.source, key, f"{path} is not a regular file")
    if st.st_mode & (stat.S_IROTH | stat.S_IWOTH):
        raise ConfigError(
            cfg.source,
            key,
            f"{path} is accessible by others (mode {st.st_mode & 0o777:o}); chmod 600 it",
        )
    data = path.read_bytes().strip()
    if len(data) < MIN_KEY_BYTES:
        raise ConfigError(
            cfg.source, key, f"{path} holds {len(data)} bytes; at least {MIN_KEY_BYTES} needed"
        )
    return data
