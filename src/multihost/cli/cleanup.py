"""``multihost cleanup``: remove what a dead agent left in the kernel.

Must not: touch a running agent's state (it refuses while the control socket answers), or
anything that is not multihost's (foreign XDP programs, other nft tables, other addresses).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from typing import Any

from multihost.cli.agent import resolve_node
from multihost.cli.common import Formatter, UsageError, add_json_flag, print_json
from multihost.config import Config, ConfigError, load_config

DESCRIPTION = """\
Remove what a stopped or killed agent leaves in the kernel, so the node is as before the
agent started: the XDP program multihost attached to the cluster interface (detached) and
its pins under cluster.bpf_pin_root (unpinned), the nft guard table (the owned table goes
away by itself with the agent), and the traffic IPs of the configuration on lo.  A clean
stop (SIGTERM) already does all of this; the systemd unit runs it as ExecStopPost for the
other cases.  Refuses while an agent answers on the control socket.  Needs root.

Without the XDP program and the traffic IPs a node takes no traffic for them: packets to a
traffic IP are not local any more (and carry a multicast MAC, so the kernel never
forwards them).

--json prints {"node", "interface", "xdp": {"detached": id|null, "unpinned": bool},
"nft_removed": bool, "addresses_removed": [...], "transparency_removed": [...]}.

examples:
  multihost cleanup --config /etc/multihost/multihost.toml
  multihost cleanup --config cluster.toml --node B --json
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "cleanup",
        help="remove what a dead agent left (XDP program, pins, guard table, traffic IPs)",
        description=DESCRIPTION,
        formatter_class=Formatter,
    )
    p.add_argument("--config", required=True, metavar="FILE", help="the TOML configuration")
    p.add_argument("--node", metavar="NAME", help="this node's [[node]] name (default: found)")
    p.add_argument("--control-socket", metavar="PATH", help="default: cluster.control_socket")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise UsageError("cleanup needs root (XDP, nftables, addresses)")
    try:
        cfg = load_config(args.config)
        node = resolve_node(cfg, args.node)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    from pathlib import Path

    from multihost.control import ControlError, request

    sock = Path(args.control_socket) if args.control_socket else cfg.cluster.control_socket
    try:
        request(sock, "status", timeout=1.0)
    except (ControlError, OSError):
        pass
    else:
        raise UsageError(f"an agent answers on {sock}: stop it first (systemctl stop multihost)")
    out: dict[str, Any] = {"node": node, "interface": cfg.cluster.interface}
    errors: list[str] = []
    from multihost.dataplane import backend, xdpattach
    from multihost.dataplane.libbpf import BpfError

    pins = backend.pin_dir(cfg.cluster.bpf_pin_root, cfg.cluster.name, node)
    try:
        extra = tuple(sorted({r.interface for r in cfg.returns} - {cfg.cluster.interface}))
        out["xdp"] = xdpattach.cleanup(cfg.cluster.interface, pins, extra_interfaces=extra)
    except (BpfError, OSError) as e:
        out["xdp"] = None
        errors.append(f"xdp: {e}")
    out["nft_removed"] = _remove_nft(cfg, errors)
    out["addresses_removed"] = _remove_addresses(cfg, errors)
    out["transparency_removed"] = _remove_transparency(cfg, errors)
    out["errors"] = errors
    if args.json:
        print_json(out)
    else:
        x = out["xdp"] or {}
        print(
            f"{node}: XDP program {x.get('detached') or 'none'} detached, pins "
            f"{'removed' if x.get('unpinned') else 'none'}; nft tables "
            f"{'removed' if out['nft_removed'] else 'none'}; traffic IPs removed from lo: "
            f"{', '.join(out['addresses_removed']) or 'none'}"
        )
        for problem in errors:
            print(f"multihost: error: {problem}", file=sys.stderr)
    return 1 if errors else 0


def _remove_nft(cfg: Config, errors: list[str]) -> bool:
    from multihost.dataplane.nft import Nft, NftError
    from multihost.dataplane.rulesettables import render_remove
    from multihost.preflight import ruleset_spec

    spec = ruleset_spec(cfg)
    try:
        with Nft() as nft:
            before = nft.run("list tables")
            nft.run(render_remove(spec))
    except NftError as e:
        errors.append(f"nft: {e}")
        return False
    return f"table inet {spec.guard_table}" in before or f"table inet {spec.table}" in before


def _remove_transparency(cfg: Config, errors: list[str]) -> list[str]:
    """The transparent-proxy plumbing a killed agent left (rule, route, nft table)."""
    from multihost.agent import transparent_setup

    setup = transparent_setup(cfg)
    if setup is None:
        return []
    try:
        return setup.remove_leftovers()
    except Exception as e:  # pyroute2 / nft errors: report, go on
        errors.append(f"transparency: {e}")
        return []


def _remove_addresses(cfg: Config, errors: list[str]) -> list[str]:
    from pyroute2 import IPRoute

    wanted = {a for g in cfg.groups for a in g.addresses}
    wanted |= {a for r in cfg.returns for a in r.addresses}
    removed: list[str] = []
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname="lo")
        if not idx:
            return removed
        for msg in ipr.get_addr(index=idx[0]):
            text = msg.get_attr("IFA_ADDRESS")
            if text is None:
                continue
            addr = ipaddress.ip_address(text)
            full = addr.max_prefixlen == msg["prefixlen"]
            if addr in wanted and full:
                try:
                    ipr.addr("del", index=idx[0], address=str(addr), prefixlen=msg["prefixlen"])
                    removed.append(str(addr))
                except Exception as e:  # pyroute2 raises NetlinkError
                    errors.append(f"lo: cannot remove {addr}: {e}")
    return removed
