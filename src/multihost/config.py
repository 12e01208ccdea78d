"""Cluster configuration: one TOML file, the same on every node -> frozen dataclasses.

Owns: the schema (``[cluster]``, ``[[node]]``, ``[[traffic_ip_group]]``; the sections of
:mod:`multihost.transparency` and :mod:`multihost.backends` are parsed by those modules,
called from :func:`parse_config`), defaults, validation across keys and sections, the
timing warnings of a valid configuration, and reading the key file.  Every error names the
file, the key path and the reason, e.g.
``/etc/multihost.toml: traffic_ip_group[0].members[2]: unknown node 'E'``.  The data model
(the dataclasses, :class:`ConfigError`, the digest) is :mod:`multihost.config_model` and the
typed field readers are :mod:`multihost.config_fields`; this module re-exports the model,
so callers import everything from here.

Must not: touch the network or the kernel.  :func:`parse_config` is pure; :func:`load_config`
only reads the file, and :func:`read_key` only checks the key file's permissions and reads it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multihost import transparency as tp
from multihost.backends import parse_backends
from multihost.config_fields import (
    Reader,
    interface_name_problem,
    read_address,
    read_choice,
    read_mcast_group,
    read_seed,
)
from multihost.config_model import (
    DEAD_AFTER_SLACK_MS,
    GROUP_RE,
    MAX_SLOTS,
    MAX_TABLE_SLOTS,
    NAME_RE,
    ClusterConfig,
    Config,
    ConfigError,
    GroupConfig,
    IPAddress,
    NodeConfig,
    default_dead_after_ms,
)
from multihost.flowhash import HashMode
from multihost.tablechoice import TABLE_KINDS

__all__ = [
    "DATAPLANES",
    "DEAD_AFTER_SLACK_MS",
    "GROUP_RE",
    "MAX_SLOTS",
    "MAX_TABLE_SLOTS",
    "METRICS_RE",
    "MIN_KEY_BYTES",
    "NAME_RE",
    "XDP_MODES",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "ConfigWarning",
    "GroupConfig",
    "IPAddress",
    "NodeConfig",
    "default_dead_after_ms",
    "load_config",
    "parse_config",
    "read_key",
    "timing_warnings",
]

MIN_KEY_BYTES = 16

METRICS_RE = re.compile(r"^(\[[0-9a-fA-F:]+\]|[0-9.]+|localhost):\d+$")

DATAPLANES = ("auto", "xdp", "nft")
XDP_MODES = ("auto", "native", "generic")


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


def _cluster(source: str, raw: Any) -> ClusterConfig:
    if not isinstance(raw, dict):
        raise ConfigError(source, "cluster", "a [cluster] table is required")
    r = Reader(source, raw, "cluster")
    name = r.get("name", str)
    if not NAME_RE.match(name):
        raise r.err("name", f"{name!r} must be 1-32 of A-Z a-z 0-9 _ . - (starting alnum)")
    interface = r.get("interface", str)
    if problem := interface_name_problem(interface):
        raise r.err("interface", problem)
    group = read_mcast_group(r, "multicast_group", r.get("multicast_group", str))
    other: dict[int, IPAddress] = {}
    for family in (4, 6):
        key = f"multicast_group{family}"
        text = r.get(key, str, None)
        if text is None:
            continue
        g = read_mcast_group(r, key, text)
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
    if metrics is not None and not METRICS_RE.match(metrics):
        raise r.err("metrics_address", f"{metrics!r} is not HOST:PORT (e.g. 127.0.0.1:9650)")
    cfg = ClusterConfig(
        name=name,
        interface=interface,
        multicast_group=group,
        port=port,
        key_file=Path(r.get("key_file", str)),
        hash_seed=read_seed(r, "hash_seed", name),
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
        dataplane=read_choice(r, "dataplane", DATAPLANES, "auto"),
        xdp_mode=read_choice(r, "xdp_mode", XDP_MODES, "auto"),
        table=read_choice(r, "table", TABLE_KINDS, "factorial"),
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
        r = Reader(source, item, path)
        name = r.get("name", str)
        if not NAME_RE.match(name):
            raise r.err("name", f"{name!r} must be 1-32 of A-Z a-z 0-9 _ . - (starting alnum)")
        address = read_address(r, r.key("address"), r.get("address", str))
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
    for i, item in enumerate(raw):
        path = f"traffic_ip_group[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(source, path, "expected a table")
        if tp.is_return_item(item):
            continue  # a return group: multihost.transparency.parse_returns
        r = Reader(source, item, path)
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
            a = read_address(r, key, text)
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
        transparent, way = tp.front_keys(r, mode)
        r.finish()
        out.append(GroupConfig(name, tuple(addrs), tuple(members), mode, transparent, way))
    if not out:
        raise ConfigError(
            source, "traffic_ip_group", "at least one [[traffic_ip_group]] without return_for"
        )
    return tuple(out)


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


def parse_config(text: str, source: str = "<config>") -> Config:
    """Parse and validate TOML text.  Pure: raises :class:`ConfigError` on any problem."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, "", f"not valid TOML: {e}") from None
    top = Reader(source, raw, "")
    cluster = _cluster(source, top.get("cluster", dict, None))
    nodes = _nodes(source, top.get("node", list, None))
    raw_groups = top.get("traffic_ip_group", list, None)
    groups = _groups(source, raw_groups, nodes)
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
