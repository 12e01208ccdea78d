"""What every ``multihost lab`` action shares: its epilog, its errors, its lab, its overview.

Owns: the FILES epilog of the ``lab`` help texts, the mapping of lab errors to exit statuses
(:func:`handle`: a :class:`~multihost.lab.naming.TopologyError` is invalid input ->
:class:`UsageError`, exit 2; a :class:`~multihost.lab.state.LabError` a failed operation ->
one ``multihost: error: ...`` line and exit 1), the ``--prefix`` and the lab it names
(:func:`prefix_of`, :func:`state_of`), and the lab overview that ``lab up`` and ``lab status``
print.  Must not: register actions (:mod:`multihost.cli.lab` does) or contain lab logic.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable

from multihost.cli.common import OperationError, UsageError, render_table
from multihost.config import DATAPLANES
from multihost.lab.naming import PREFIX_ENV, TopologyError, default_prefix, validate_prefix
from multihost.lab.state import LabError, LabState, load_state
from multihost.tablechoice import table_identity

FILES = f"""\
files:
  /run/multihost-lab/PREFIX/state.json   what the lab created and started (PIDs, start times)
  /run/multihost-lab/PREFIX/             nginx configs and logs, UDP echo logs
  /run/netns/PREFIX{{sw,A..P,c1..c8}}      the lab's network namespaces
  /run/netns/PREFIX{{bsw,b1,b2,rt}}        back-end switch, back ends, router

environment:
  {PREFIX_ENV}   name prefix of everything the lab creates (default 'mh-'); --prefix wins

exit status: 0 success, 1 the operation failed, 2 invalid input."""


def handle(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    @functools.wraps(func)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except TopologyError as e:
            raise UsageError(str(e)) from None
        except LabError as e:
            raise OperationError(str(e)) from None

    return wrapper


def prefix_of(args: argparse.Namespace) -> str:
    return validate_prefix(args.prefix or default_prefix())


def state_of(args: argparse.Namespace) -> LabState:
    prefix = prefix_of(args)
    state = load_state(prefix)
    if state is None:
        raise LabError(
            f"no lab with prefix {prefix!r} is up ('multihost lab up' builds one; "
            "'multihost lab clean' removes leftovers of a broken one)"
        )
    return state


def print_overview(state: LabState) -> None:
    topo = state.topology
    print(
        f"  traffic IP {' '.join(topo.vips)} tcp/{topo.port} udp/{topo.echo_port}  "
        f"group {topo.group} (MAC {topo.group_mac})"
        + (f", heartbeats {topo.group6} (MAC {topo.group6_mac})" if topo.group6 else "")
    )
    print(
        f"  seed {topo.seed_text}, {topo.buckets} buckets ({table_identity(topo.table).name}),"
        f" hash {topo.hash_mode}, "
        f"switch {topo.switch.netns} ({topo.switch.mode.value})"
    )
    print(f"  live: {','.join(state.live) or '(none)'}\n")
    rows = [[h.name, h.role, h.netns, h.address, h.address6 or "-", h.mac] for h in topo.hosts]
    if topo.router is not None:
        rt = topo.router
        rows.append(["rt", f"router ({rt.neigh.value})", rt.netns, rt.address, "-", rt.mac])
    bn = topo.backnet
    if bn is not None:
        rows += [[b.name, "back end", b.netns, b.address, "-", b.mac] for b in bn.backends]
    print(render_table(["HOST", "ROLE", "NETNS", "ADDRESS", "ADDRESS6", "MAC"], rows))
    if bn is not None:
        print(
            f"\ntransparent: {bn.proxy.value} proxies, return {bn.mode.value}"
            + (f" via {bn.return_vip}" if bn.return_vip else " (per-node routes)")
            + ", node gateways "
            + " ".join(f"{n}={a}" for n, a in bn.gateways)
        )


def add_backend_option(a: argparse.ArgumentParser) -> None:
    """``--backend``, for the actions that build a lab and start its agents."""
    a.add_argument(
        "--backend",
        choices=DATAPLANES,
        default="auto",
        help="the agents' data plane: cluster.dataplane (default auto: xdp if it can run)",
    )
