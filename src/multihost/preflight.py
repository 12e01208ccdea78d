"""What the agent accepts: the one validation path of ``multihost agent`` and ``check-config``.

Owns: loading a configuration the way the agent does (:func:`load`: parse, key file, then
:func:`check`), building the agent's pure specs from it — the nft :class:`RulesetSpec`
(:func:`ruleset_spec`) and the membership core's :class:`MembershipConfig`
(:func:`membership_config`) — and the start-time rules that only the agent's effects would
otherwise hit (the heartbeat source address family, the control socket path length, the
metrics port).  Every refusal is a :class:`~multihost.config.ConfigError` naming the file,
the key path and the value, so ``check-config`` and the agent print the same line.

The agent (``cli/agent.py``, and ``Agent`` on SIGHUP) and ``check-config`` call :func:`load`;
nothing here is a copy of a check made elsewhere: the data plane's and the membership
core's own constructors and ``check()`` methods run, and their errors are given a key.

Must not: change the host (no sockets, no kernel writes); it reads the file, the key file
and, with ``host=True`` and ``dataplane = "xdp"``, whether this machine can run XDP.
"""

from __future__ import annotations

import os

from multihost.config import (
    MIN_KEY_BYTES,
    Config,
    ConfigError,
    IPAddress,
    load_config,
    read_key,
)
from multihost.dataplane.ruleset import GroupSpec, ReturnSpec, RulesetError, RulesetSpec
from multihost.macaddr import format_mac, multicast_mac
from multihost.membership.config import MembershipConfig, MembershipConfigError
from multihost.tablechoice import BACKEND_MAX_SLOTS, backend_problem

#: ``sun_path`` of ``struct sockaddr_un`` holds 108 bytes, one of them the NUL.
MAX_SOCKET_PATH_BYTES = 107

#: A membership core message (lower case) -> the configuration key it is about.  The core
#: validates names, slots and members too, but the parser refuses those first.
_MEMBERSHIP_KEYS: tuple[tuple[str, str], ...] = (
    ("groups configured", "traffic_ip_group"),
    ("group name", "traffic_ip_group"),
    ("cluster name", "cluster.name"),
    ("node name", "node"),
    ("member", "node"),
    ("slot", "node"),
    ("lease_margin", "cluster.lease_margin_ms"),
    ("jitter", "cluster.heartbeat_jitter_ms"),
    ("dead_after", "cluster.dead_after_ms"),
    ("takeover_hold", "cluster.takeover_hold_ms"),
    ("interval", "cluster.heartbeat_interval_ms"),
    ("key", "cluster.key_file"),
)


def group_spec(cfg: Config, index: int) -> GroupSpec:
    g = cfg.groups[index]
    return GroupSpec(g.name, g.addresses, g.hash)


def cluster_macs(cfg: Config) -> tuple[tuple[int, str], ...]:
    """Family -> the cluster MAC its traffic IPs (and return gateways) are answered with."""
    c = cfg.cluster
    return tuple(
        (fam, format_mac(multicast_mac(g)))
        for fam, g in ((4, c.arp_group), (6, c.ndp_group))
        if g is not None
    )


def ruleset_spec(cfg: Config) -> RulesetSpec:
    """The agent's data plane spec (without the buckets it serves); return groups select
    replies by interface and cluster MAC and decide them by their front group's buckets."""
    macs = cluster_macs(cfg)
    return RulesetSpec(
        buckets=cfg.buckets,
        seed=cfg.cluster.hash_seed,
        groups=tuple(group_spec(cfg, i) for i in range(len(cfg.groups))),
        returns=tuple(
            ReturnSpec(r.name, r.front, r.addresses, r.interface, r.hash, macs) for r in cfg.returns
        ),
    )


def membership_config(cfg: Config, node: str, key: bytes) -> MembershipConfig:
    """The membership core's configuration for ``node`` (raises MembershipConfigError)."""
    c = cfg.cluster
    return MembershipConfig(
        cluster=c.name,
        node=node,
        members=cfg.slots,
        groups={g.name: frozenset(g.members) for g in cfg.groups},
        key=key,
        interval=c.heartbeat_interval_ms / 1000,
        dead_after=c.dead_after_ms / 1000,
        config_digest=cfg.digest(),
        quorum=c.quorum,
        takeover_hold=c.takeover_hold_ms / 1000,
        lease_margin=c.lease_margin_ms / 1000,
        jitter=c.heartbeat_jitter_ms / 1000,
        strict_transitions=False,
        table=cfg.table,
    )


def heartbeat_address(cfg: Config, node: str) -> IPAddress:
    """The source address of ``node``'s heartbeats: its node address, which must be of the
    heartbeat group's family (IPv6: global, or link-local on the cluster interface)."""
    n = cfg.node(node)
    group = cfg.cluster.multicast_group
    if n.address.version != group.version:
        i = cfg.nodes.index(n)
        raise ConfigError(
            cfg.source,
            f"node[{i}].address",
            f"{n.address}: heartbeats go to cluster.multicast_group {group} (IPv{group.version}),"
            f" so node addresses must be IPv{group.version} too",
        )
    return n.address


def _ruleset(cfg: Config) -> None:
    for i in range(len(cfg.groups)):
        try:
            group_spec(cfg, i).check()
        except RulesetError as e:
            key = f"traffic_ip_group[{i}]"
            if str(e).startswith("group name"):
                key += ".name"
            raise ConfigError(cfg.source, key, str(e)) from None
    try:
        ruleset_spec(cfg).check()
    except RulesetError as e:
        raise ConfigError(cfg.source, "traffic_ip_group", str(e)) from None


def _membership(cfg: Config, key: bytes | None) -> None:
    for n in cfg.nodes:
        heartbeat_address(cfg, n.name)
    # Without the key (check-config --no-key) the core gets a stand-in of the minimum
    # length; read_key enforces that length on the real one.
    secret = key if key is not None else bytes(MIN_KEY_BYTES)
    for n in cfg.nodes:
        try:
            membership_config(cfg, n.name, secret)
        except MembershipConfigError as e:
            text = str(e)
            where = next((k for w, k in _MEMBERSHIP_KEYS if w in text.lower()), "cluster")
            if where.startswith("cluster."):  # name the configured value too
                text = f"{getattr(cfg.cluster, where.removeprefix('cluster.'))}: {text}"
            raise ConfigError(cfg.source, where, text) from None


def _host_limits(cfg: Config) -> None:
    c = cfg.cluster
    sock = os.fsencode(c.control_socket)
    if len(sock) > MAX_SOCKET_PATH_BYTES:
        raise ConfigError(
            cfg.source,
            "cluster.control_socket",
            f"{str(c.control_socket)!r} is {len(sock)} bytes long;"
            f" a unix socket path holds at most {MAX_SOCKET_PATH_BYTES}",
        )
    if c.metrics_address is not None:
        port = int(c.metrics_address.rpartition(":")[2])
        if not 1 <= port <= 65535:
            raise ConfigError(
                cfg.source,
                "cluster.metrics_address",
                f"{c.metrics_address!r}: port {port} is outside 1..65535",
            )


def _table(cfg: Config) -> None:
    """The cluster table must fit the data plane (``dataplane = "auto"`` may fall back to
    nft, so it is held to nft's limit: set ``"xdp"`` explicitly for bigger tables).  A group
    too big is named first (its members, or their weights), then the node whose slot or
    weight takes the table past the limit."""
    dp = cfg.cluster.dataplane
    backend = "xdp" if dp == "xdp" else "nft"
    where = "" if dp == "nft" else f' (cluster.dataplane = "{dp}")'
    weight = {n.name: n.weight for n in cfg.nodes}
    for i, g in enumerate(cfg.groups):
        size = sum(weight[m] for m in g.members)
        problem = backend_problem(size, backend)
        if problem is not None:
            what = f"{len(g.members)} members"
            if size != len(g.members):
                what += f" of total weight {size}"
            raise ConfigError(
                cfg.source,
                f"traffic_ip_group[{i}].members",
                f"group {g.name!r} has {what}: {problem}{where}",
            )
    if dp == "xdp":
        from multihost.dataplane.xdplayout import limits_problem

        naddr = sum(len(g.addresses) for g in cfg.groups)
        too_big = limits_problem(len(cfg.groups), cfg.buckets, naddr)
        if too_big is not None:
            raise ConfigError(cfg.source, too_big[0], f'dataplane = "xdp": {too_big[1]}')
    problem = backend_problem(cfg.table_slots, backend)
    if problem is None:
        return
    if cfg.weighted:
        order = sorted(cfg.nodes, key=lambda n: n.slot)
        limit = BACKEND_MAX_SLOTS[backend]
        top = next(n for k, n in enumerate(order) if sum(m.weight for m in order[: k + 1]) > limit)
        weights = ", ".join(f"{n.name}={n.weight}" for n in order)
        raise ConfigError(
            cfg.source,
            f"node[{cfg.nodes.index(top)}].weight",
            f"the weights add up to {cfg.table_slots} ({weights}): {problem}{where}",
        )
    top = max(cfg.nodes, key=lambda n: n.slot)
    raise ConfigError(
        cfg.source,
        f"node[{cfg.nodes.index(top)}].slot",
        f"slot {top.slot} (node {top.name!r}): {problem}{where}",
    )


def check(cfg: Config, key: bytes | None = None) -> None:
    """Everything the agent refuses before it touches the host; raises ConfigError."""
    _table(cfg)
    _ruleset(cfg)
    _membership(cfg, key)
    _host_limits(cfg)


def check_dataplane(cfg: Config) -> None:
    """``dataplane = "xdp"`` on a machine that cannot run it: a ConfigError saying what is
    missing (the agent refuses to start for the same reason)."""
    if cfg.cluster.dataplane != "xdp":
        return
    from multihost.dataplane.xdplayout import limits_problem
    from multihost.dataplane.xdpobject import unavailable_reason

    naddr = sum(len(g.addresses) for g in cfg.groups) + sum(len(r.addresses) for r in cfg.returns)
    problem = limits_problem(len(cfg.groups) + len(cfg.returns), cfg.buckets, naddr)
    if problem is not None:
        raise ConfigError(cfg.source, problem[0], f'dataplane = "xdp": {problem[1]}')

    reason = unavailable_reason()
    if reason is not None:
        raise ConfigError(cfg.source, "cluster.dataplane", f'"xdp" cannot run here: {reason}')


def load(
    path: str | os.PathLike[str],
    *,
    with_key: bool = True,
    node: str | None = None,
    host: bool = True,
) -> tuple[Config, bytes | None]:
    """Load ``path`` exactly as the agent does: parse, read the key (``with_key``), check,
    and (``host``) check that this machine can run the configured data plane.

    ``node``, if given, must be a configured node.  Returns the configuration and the key
    (None without ``with_key``).  ``host=False`` is for tools that only compute from the
    file (``whohas``, ``simulate``), possibly on a workstation.
    """
    cfg = load_config(path)
    key = read_key(cfg) if with_key else None
    check(cfg, key)
    if host:
        check_dataplane(cfg)
    if node is not None:
        cfg.node(node)
    return cfg, key
