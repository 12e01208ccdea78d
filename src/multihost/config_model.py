"""The cluster configuration's data model: what a validated configuration is.

Owns: the frozen dataclasses (:class:`ClusterConfig`, :class:`NodeConfig`,
:class:`GroupConfig`, :class:`Config`), :class:`ConfigError` (``path: key: reason``), the
limits shared by every section (name syntax, node and table slots, the default
``dead_after_ms``), what follows from a configuration (its multicast groups, weights and
preference table), the digest of the ownership-relevant part (carried in heartbeats so
members with different configurations never share buckets), and finding this node's entry.

Must not: read or validate TOML (:mod:`multihost.config` does, with the field readers of
:mod:`multihost.config_fields`), or touch files, the network or the kernel.  Callers import
it through :mod:`multihost.config`, which re-exports it; only the modules
:mod:`multihost.config` itself imports (``config_fields``, ``transparency``, ``backends``)
import it directly.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from multihost.assignment import PreferenceTable
from multihost.flowhash import HashMode
from multihost.tablechoice import cluster_table, table_identity, table_size_slots

if TYPE_CHECKING:
    from multihost.backends import BackendConfig
    from multihost.transparency import ReturnGroupConfig, TransparencyConfig

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
GROUP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,23}$")
# Default dead_after: two intervals (one lost heartbeat) plus this much lateness (at least;
# a quarter interval above 120 ms intervals).
DEAD_AFTER_SLACK_MS = 30


def default_dead_after_ms(interval_ms: int) -> int:
    return 2 * interval_ms + max(DEAD_AFTER_SLACK_MS, interval_ms // 4)


# Node slots (heartbeat mask bits, table slots): the wire format (version 2) carries 16.
MAX_SLOTS = 16
# A node of weight k holds k virtual slots of the table; a table has at most 16 slots.
MAX_TABLE_SLOTS = 16


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
