"""The traffic IP group a ``whohas`` / ``simulate`` question is about: from ``--config``
(the configured slots, seed and hash mode, loaded as the agent loads them) or from the
explicit ``--members [--slots]`` form.

Must not: compute ownership (``ownership``/``simulation`` do) or touch the network.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field

from multihost import preflight
from multihost.assignment import PreferenceTable
from multihost.cli.common import UsageError
from multihost.config import Config, ConfigError, IPAddress
from multihost.flowhash import HashMode
from multihost.simulation import (
    SimulationError,
    member_table,
    parse_members,
    parse_slots,
    parse_weights,
)
from multihost.tablechoice import TABLE_KINDS


@dataclass(frozen=True)
class Group:
    """One group's members, each at its slot with its weight, the cluster table, and how
    its flows are hashed."""

    members: tuple[str, ...]
    slots: Mapping[str, int]
    table: PreferenceTable
    weights: Mapping[str, int]
    mode: HashMode = HashMode.FOUR_TUPLE
    seed: int | None = None
    name: str | None = None  # None: the --members form
    addresses: tuple[IPAddress, ...] = ()
    config: Config | None = field(default=None, repr=False)
    note: str | None = None  # e.g. the flow's destination is not one of the group's IPs
    front: str | None = None  # a return group: the group whose buckets (and live set) decide


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        metavar="FILE",
        help="the cluster configuration: members, slots, seed and hash mode as the agent uses",
    )
    p.add_argument(
        "--group",
        metavar="NAME",
        help="the traffic IP group (default: the group of the flow's destination, or the"
        " only group); a return group (return_for) takes a back end's reply,"
        " BACKEND:PORT-CLIENT:PORT, and answers for its front group's buckets",
    )


def add_members_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--members", metavar="A,B,...", help="1-16 member names (instead of --config)")
    p.add_argument(
        "--slots",
        metavar="S,S,...",
        help="the slot of each --members entry, e.g. 1,3 for members B,D of a 4-node"
        " cluster (default: position in --members, 0,1,2,...)",
    )
    p.add_argument(
        "--weights",
        metavar="A=K,...",
        help="member weights (integer >= 1, default 1): a member of weight K holds K of the"
        " table's slots and K times the share; the sum is at most 16",
    )
    p.add_argument(
        "--table",
        choices=TABLE_KINDS,
        help="the table kind, as [cluster] table: factorial (default; 8! = 40,320 buckets"
        " up to 8 slots) or minimal (lcm(1..n) buckets: 12 for 4 slots)",
    )


def conflicts(args: argparse.Namespace, options: Mapping[str, object]) -> None:
    """``--config`` xor ``--members``; the options in ``options`` only with ``--members``."""
    if args.config and args.members:
        raise UsageError("--config and --members exclude each other (the file names members)")
    if not args.config and not args.members:
        raise UsageError("either --config FILE or --members A,B,... is required")
    if args.config:
        for opt, value in options.items():
            if value is not None:
                raise UsageError(f"{opt} comes from the configuration; drop it or --config")
    elif args.group:
        raise UsageError("--group needs --config")


def from_members(args: argparse.Namespace, mode: HashMode, seed: int | None) -> Group:
    try:
        members = parse_members(args.members)
        slots = parse_slots(args.slots, members) if args.slots else tuple(range(len(members)))
        weights = parse_weights(args.weights or "", members)
        table = member_table(slots, weights, args.table or "factorial")
    except SimulationError as e:
        raise UsageError(str(e)) from None
    return Group(
        members,
        dict(zip(members, slots, strict=True)),
        table,
        dict(zip(members, weights, strict=True)),
        mode,
        seed,
    )


def from_config(path: str, group: str | None, destination: IPAddress | None = None) -> Group:
    """The group named ``group``, else the one serving ``destination``, else the only one."""
    try:
        cfg, _ = preflight.load(path, with_key=False, host=False)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    names = ", ".join([g.name for g in cfg.groups] + [r.name for r in cfg.returns])
    ret = next((r for r in cfg.returns if r.name == group), None)
    if ret is not None:  # a reply (back end -> client): hashed on the client side
        front = cfg.front_of(ret)
        return _configured(cfg, front.members, ret.hash, ret.name, ret.addresses, front=front.name)
    serving = next((g for g in cfg.groups if destination in g.addresses), None)
    note = None
    if group is not None:
        chosen = next((g for g in cfg.groups if g.name == group), None)
        if chosen is None:
            raise UsageError(f"--group {group!r}: {cfg.source} has no such group (groups: {names})")
        if serving is not None and serving is not chosen:
            raise UsageError(
                f"--group {group!r}: {destination} is a traffic IP of group {serving.name!r}"
            )
    elif serving is not None:
        chosen = serving
    elif len(cfg.groups) == 1:
        chosen = cfg.groups[0]
    else:
        raise UsageError(
            f"{cfg.source} has {len(cfg.groups)} groups ({names});"
            + (f" {destination} is none's traffic IP;" if destination else "")
            + " pass --group NAME"
        )
    if destination is not None and destination not in chosen.addresses:
        addrs = ", ".join(str(a) for a in chosen.addresses)
        note = f"{destination} is not a traffic IP of group {chosen.name!r} ({addrs})"
    return _configured(cfg, chosen.members, chosen.hash, chosen.name, chosen.addresses, note=note)


def _configured(
    cfg: Config,
    members: tuple[str, ...],
    mode: HashMode,
    name: str,
    addresses: tuple[IPAddress, ...],
    *,
    note: str | None = None,
    front: str | None = None,
) -> Group:
    """A :class:`Group` of ``cfg``: its members at their configured slots and weights."""
    weight = {n.name: n.weight for n in cfg.nodes}
    return Group(
        members=members,
        slots={m: cfg.slots[m] for m in members},
        table=cfg.table,
        weights={m: weight[m] for m in members},
        mode=mode,
        seed=cfg.cluster.hash_seed,
        name=name,
        addresses=addresses,
        config=cfg,
        note=note,
        front=front,
    )
