"""``multihost check-config FILE``: validate a configuration without touching anything.

Must not: change the host; it only reads the file and the key file.
"""

from __future__ import annotations

import argparse
import sys

from multihost.cli.common import Formatter, add_json_flag, print_json
from multihost.config import Config, ConfigError, load_config, read_key, timing_warnings
from multihost.macaddr import format_mac, multicast_mac

DESCRIPTION = """\
Validate a multihost configuration file (TOML) and its key file.  Nothing on the host is
changed.  Every error names the file, the key path and the reason, e.g.

  /etc/multihost/multihost.toml: traffic_ip_group[0].members[2]: unknown node 'E'

Valid configurations that work badly get warnings naming the key (e.g. a dead_after_ms
too close to the heartbeat interval for heartbeat_jitter_ms); the agent logs the same
ones at start and refuses exactly what this command refuses.

Exit status: 0 valid (warnings or not), 2 invalid.  With --json, one object:
{"valid": true, "warnings": [{"key": ..., "reason": ...}], ...} or
{"valid": false, "error": {"file": ..., "key": ..., "reason": ...}}.
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
    return {
        "valid": True,
        "file": cfg.source,
        "cluster": c.name,
        "interface": c.interface,
        "multicast_group": str(c.multicast_group),
        "multicast_mac": format_mac(multicast_mac(c.multicast_group)),
        "heartbeat_interval_ms": c.heartbeat_interval_ms,
        "dead_after_ms": c.dead_after_ms,
        "takeover_hold_ms": c.takeover_hold_ms,
        "lease_margin_ms": c.lease_margin_ms,
        "heartbeat_jitter_ms": c.heartbeat_jitter_ms,
        "warnings": [{"key": w.key, "reason": w.reason} for w in timing_warnings(cfg.source, c)],
        "hash_seed": f"{c.hash_seed:#010x}",
        "dataplane": c.dataplane,
        "buckets": cfg.buckets,
        "digest": cfg.digest().hex(),
        "nodes": {n.name: {"address": str(n.address), "slot": n.slot} for n in cfg.nodes},
        "groups": {
            g.name: {
                "addresses": [str(a) for a in g.addresses],
                "members": list(g.members),
                "hash": g.hash.value,
            }
            for g in cfg.groups
        },
    }


def check_dataplane(cfg: Config) -> None:
    """``dataplane = "xdp"`` on a machine that cannot run it: a ConfigError saying what is
    missing (the agent refuses to start for the same reason)."""
    if cfg.cluster.dataplane != "xdp":
        return
    from multihost.dataplane.xdp import unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        raise ConfigError(cfg.source, "cluster.dataplane", f'"xdp" cannot run here: {reason}')


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.file)
        if not args.no_key:
            read_key(cfg)
        check_dataplane(cfg)
    except ConfigError as e:
        if args.json:
            print_json(
                {"valid": False, "error": {"file": e.source, "key": e.key, "reason": e.reason}}
            )
        print(f"multihost: error: {e}", file=sys.stderr)
        return 2
    s = summary(cfg)
    if args.json:
        print_json(s)
        return 0
    for w in timing_warnings(cfg.source, cfg.cluster):
        print(f"multihost: warning: {w}", file=sys.stderr)
    print(f"{cfg.source}: valid")
    print(
        f"  cluster {s['cluster']} on {s['interface']}, group {s['multicast_group']}"
        f" (ARP MAC {s['multicast_mac']}), seed {s['hash_seed']}"
    )
    c = cfg.cluster
    print(
        f"  heartbeats every {c.heartbeat_interval_ms} ms, dead after {c.dead_after_ms} ms,"
        f" hold {c.takeover_hold_ms} ms, lease margin {c.lease_margin_ms} ms,"
        f" jitter {c.heartbeat_jitter_ms} ms"
    )
    for n in cfg.nodes:
        print(f"  node {n.name}: {n.address} slot {n.slot}")
    for g in cfg.groups:
        addrs = ", ".join(str(a) for a in g.addresses)
        print(f"  group {g.name}: {addrs} members {','.join(g.members)} hash {g.hash.value}")
    return 0
