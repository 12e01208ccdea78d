"""``multihost check-config FILE``: validate a configuration without touching anything.

Must not: change the host; it only reads the file and the key file.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from multihost import preflight
from multihost.backends import BackendConfig
from multihost.cli.common import EXIT_USAGE, Formatter, add_json_flag, print_json
from multihost.config import Config, ConfigError, timing_warnings
from multihost.macaddr import format_mac, multicast_mac
from multihost.tablechoice import table_identity

DESCRIPTION = """\
Validate a multihost configuration file (TOML) and its key file.  Nothing on the host is
changed.  It runs the very function the agent runs to load its configuration, so a file
check-config accepts is one the agent accepts (names the nft data plane can use, IPv4 node
addresses for the heartbeats, at most 512 groups, membership timing, control socket path
length, the [[backend]] tables of backend-routes, ...) and the other way round.  Every
error names the file, the key path and the reason, e.g.

  /etc/multihost/multihost.toml: traffic_ip_group[0].members[2]: unknown node 'E'

Valid configurations that work badly get warnings naming the key (e.g. a dead_after_ms
too close to the heartbeat interval for heartbeat_jitter_ms); the agent logs the same
ones at start and refuses exactly what this command refuses.  It also says whether
cluster.interface exists on this host (a note, not an error: the file may be checked on a
workstation).

Exit status: 0 valid (warnings or not), 2 invalid.  With --json, one object:
{"valid": true, "warnings": [{"key": ..., "reason": ...}], ...} or
{"valid": false, "ok": false, "code": 2, "message": "...",
 "error": {"file": ..., "key": ..., "reason": ...}}.
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "check-config",
        help="validate a configuration file",
        description=DESCRIPTION,
        formatter_class=Formatter,
    )
    p.add_argument("file", metavar="FILE", help="the TOML configuration file")
    p.add_argument(
        "--no-key", action="store_true", help="do not check the key file (e.g. on a workstation)"
    )
    add_json_flag(p)
    p.set_defaults(func=run)


def summary(cfg: Config) -> dict[str, object]:
    c = cfg.cluster
    t = cfg.transparency
    return {
        "valid": True,
        "file": cfg.source,
        "cluster": c.name,
        "interface": c.interface,
        "interface_present": interface_present(c.interface),
        "multicast_group": str(c.multicast_group),
        "multicast_mac": format_mac(multicast_mac(c.multicast_group)),
        "multicast_group4": _opt(c.multicast_group4),
        "multicast_group6": _opt(c.multicast_group6),
        "arp_mac": None if c.arp_group is None else format_mac(multicast_mac(c.arp_group)),
        "ndp_mac": None if c.ndp_group is None else format_mac(multicast_mac(c.ndp_group)),
        "heartbeat_interval_ms": c.heartbeat_interval_ms,
        "dead_after_ms": c.dead_after_ms,
        "takeover_hold_ms": c.takeover_hold_ms,
        "lease_margin_ms": c.lease_margin_ms,
        "heartbeat_jitter_ms": c.heartbeat_jitter_ms,
        "warnings": [{"key": w.key, "reason": w.reason} for w in timing_warnings(cfg.source, c)],
        "hash_seed": f"{c.hash_seed:#010x}",
        "dataplane": c.dataplane,
        "buckets": cfg.buckets,
        "table": table_identity(cfg.table).as_dict(),
        "digest": cfg.digest().hex(),
        "nodes": {
            n.name: {"address": str(n.address), "slot": n.slot, "weight": n.weight}
            for n in cfg.nodes
        },
        "groups": {
            g.name: {
                "addresses": [str(a) for a in g.addresses],
                "members": list(g.members),
                "hash": g.hash.value,
                "transparent": g.transparent,
                "return": g.return_way or None,
            }
            for g in cfg.groups
        },
        "return_groups": {
            r.name: {
                "return_for": r.front,
                "addresses": [str(a) for a in r.addresses],
                "interface": r.interface,
                "members": list(r.members),
                "hash": r.hash.value,
            }
            for r in cfg.returns
        },
        "transparency": None if t is None else asdict(t),
        "backends": {b.name: _backend(b) for b in cfg.backends},
    }


def _backend(b: BackendConfig) -> dict[str, object]:
    return {
        "interface": b.interface,
        "table_base": b.table_base,
        "rule_priority_base": b.rule_priority_base,
        "nodes": {
            p.node: {
                "address": p.address.with_prefixlen,
                "gateway": str(p.gateway),
                "table": p.table,
                "priority": p.priority,
            }
            for p in b.paths
        },
    }


def _macs(s: dict[str, object]) -> str:
    macs = [f"{k} MAC {s[f'{k.lower()}_mac']}" for k in ("ARP", "NDP") if s[f"{k.lower()}_mac"]]
    return ", ".join(macs)


def _opt(value: object | None) -> str | None:
    return None if value is None else str(value)


def interface_present(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def run(args: argparse.Namespace) -> int:
    try:
        cfg, _ = preflight.load(args.file, with_key=not args.no_key)
    except ConfigError as e:
        if args.json:
            print_json(
                {
                    "valid": False,
                    "ok": False,
                    "code": EXIT_USAGE,
                    "message": str(e),
                    "error": {"file": e.source, "key": e.key, "reason": e.reason},
                }
            )
        print(f"multihost: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    s = summary(cfg)
    if args.json:
        print_json(s)
        return 0
    for w in timing_warnings(cfg.source, cfg.cluster):
        print(f"multihost: warning: {w}", file=sys.stderr)
    print(f"{cfg.source}: valid")
    print(
        f"  cluster {s['cluster']} on {s['interface']}, group {s['multicast_group']}"
        f" ({_macs(s)}), seed {s['hash_seed']}"
    )
    c = cfg.cluster
    print(
        f"  heartbeats every {c.heartbeat_interval_ms} ms, dead after {c.dead_after_ms} ms,"
        f" hold {c.takeover_hold_ms} ms, lease margin {c.lease_margin_ms} ms,"
        f" jitter {c.heartbeat_jitter_ms} ms"
    )
    t = table_identity(cfg.table)
    print(
        f"  table {t.name}: {t.buckets} buckets over {t.slots} slots"
        f" (sha256 {t.sha256[:16]}...), digest {s['digest']}"
    )
    for n in cfg.nodes:
        weight = f" weight {n.weight}" if cfg.weighted else ""
        print(f"  node {n.name}: {n.address} slot {n.slot}{weight}")
    for g in cfg.groups:
        addrs = ", ".join(str(a) for a in g.addresses)
        print(f"  group {g.name}: {addrs} members {','.join(g.members)} hash {g.hash.value}")
        if g.transparent:
            print(f"    transparent, replies return by {g.return_way}")
    for r in cfg.returns:
        addrs = ", ".join(str(a) for a in r.addresses)
        print(
            f"  return group {r.name} for {r.front}: gateway {addrs} on {r.interface},"
            f" hash {r.hash.value}"
        )
    tp = cfg.transparency
    if tp is not None and any(g.transparent for g in cfg.groups):
        print(
            f"  transparency: socket mark {tp.fwmark:#x}, rule priority {tp.rule_priority}"
            f" -> table {tp.table} (local default dev lo)"
        )
    for b in cfg.backends:
        print(f"  backend {b.name} on {b.interface}: replies from")
        for p in b.paths:
            how = f"table {p.table}, rule priority {p.priority}"
            print(f"    {p.address} via {p.node}'s {p.gateway} ({how})")
    if not s["interface_present"]:
        print(f"  note: interface {cfg.cluster.interface!r} does not exist on this host")
    return 0
