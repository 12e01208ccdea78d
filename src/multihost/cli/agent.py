"""``multihost agent``: run this node's agent in the foreground (systemd runs it so).

Must not: contain agent logic (``multihost.agent``); only argument handling.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import sys
from pathlib import Path

from multihost import preflight
from multihost.cli.common import Formatter, UsageError
from multihost.config import Config, ConfigError, timing_warnings
from multihost.logfmt import EventLog

DESCRIPTION = """\
Run the multihost agent for this node in the foreground.  The agent puts the traffic IPs
on lo, answers ARP for them with the cluster's multicast MAC, holds the node's nftables
filter (an owner-flagged table: if the agent dies, the kernel removes it and the node stops
answering), exchanges authenticated heartbeats with the other members on the cluster
multicast group, and reprograms the filter whenever the live set changes.

The node is --node NAME, or the [[node]] whose address is configured on this host.
The configuration is checked exactly as 'multihost check-config' checks it (one function):
a file check-config accepts, the agent accepts, and the other way round.

signals:
  SIGTERM, SIGINT  clean stop: release every bucket, remove addresses and rules,
                   restore the sysctls the agent changed
  SIGHUP           re-read the configuration; applied only if valid

--manual runs without heartbeats: the live set is whatever the last
'set-live' control request said (the network lab uses it to push ownership by hand).
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "agent",
        help="run the node agent (foreground)",
        description=DESCRIPTION,
        formatter_class=Formatter,
    )
    p.add_argument("--config", required=True, metavar="FILE", help="cluster configuration")
    p.add_argument("--node", metavar="NAME", help="this node's [[node]] name")
    p.add_argument("--manual", action="store_true", help="no heartbeats; ownership by set-live")
    p.add_argument(
        "--control-socket",
        metavar="PATH",
        type=Path,
        help="control socket path (default: cluster.control_socket)",
    )
    p.set_defaults(func=run)


def _local_addresses() -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return [ipaddress.ip_address(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr()]


def resolve_node(cfg: Config, name: str | None) -> str:
    if name is not None:
        return cfg.node(name).name
    return cfg.find_local_node(_local_addresses()).name


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise UsageError("the agent needs root (nftables, raw sockets, sysctls)")
    try:
        cfg, _ = preflight.load(args.config, with_key=not args.manual)
        sock = args.control_socket
        if sock is not None and len(os.fsencode(sock)) > preflight.MAX_SOCKET_PATH_BYTES:
            raise UsageError(
                f"--control-socket {str(sock)!r}: a unix socket path holds at most"
                f" {preflight.MAX_SOCKET_PATH_BYTES} bytes"
            )
        node = resolve_node(cfg, args.node)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    from multihost.agent import Agent
    from multihost.dataplane.xdpobject import XdpError

    log = EventLog(node=node)
    for w in timing_warnings(cfg.source, cfg.cluster):  # the same as check-config prints
        log("config-warning", level="warning", key=w.key, reason=w.reason)
    agent = Agent(cfg, node, manual=args.manual, control_socket=args.control_socket, log=log)
    try:
        return asyncio.run(agent.run())
    except (OSError, XdpError) as e:
        log("failed", level="error", error=str(e))
        print(f"multihost: error: {e}", file=sys.stderr)
        return 1
