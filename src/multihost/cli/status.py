"""``multihost status``: what the local agent is doing, over its control socket.

Must not: change anything.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from multihost.cli.common import (
    Formatter,
    OperationError,
    UsageError,
    add_json_flag,
    print_json,
    render_table,
)
from multihost.config import ConfigError, load_config
from multihost.control import ControlError, request

DEFAULT_SOCKET = Path("/run/multihost/control.sock")

DESCRIPTION = """\
Ask the local agent for its state: members (state, last heard, boot id, their view),
per traffic IP group the live members, shares and this node's owned ranges, the
ownership epoch, kernel update timings and counters.

The socket is --socket, else cluster.control_socket from --config, else
/run/multihost/control.sock.  Exit status 1 if no agent answers.
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "status",
        help="show the local agent's state",
        description=DESCRIPTION,
        formatter_class=Formatter,
    )
    add_socket_args(p)
    add_json_flag(p)
    p.set_defaults(func=run)


def add_socket_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", type=Path, metavar="PATH", help="agent control socket")
    p.add_argument("--config", metavar="FILE", help="read cluster.control_socket from FILE")


def socket_path(args: argparse.Namespace) -> Path:
    if args.socket is not None:
        return Path(args.socket)
    if args.config:
        try:
            return load_config(args.config).cluster.control_socket
        except ConfigError as e:
            raise UsageError(str(e)) from None
    return DEFAULT_SOCKET


def to_text(st: dict[str, Any]) -> str:
    lines = [
        f"node {st['node']} (slot {st['slot']}) in cluster {st['cluster']}, mode {st['mode']},"
        f" boot {st['boot_id']}, up {st['uptime_s']:.0f}s",
        f"live: {','.join(st['live']) or '(none)'}"
        + (f"   epoch {st['epoch']}" if "epoch" in st else ""),
    ]
    table = st.get("table")
    if table:
        weights = table.get("weights") or {}
        lines.append(
            f"table {table['name']}: {table['buckets']} buckets over {table['slots']} slots"
            + (
                "; weights " + ", ".join(f"{m}={w}" for m, w in weights.items())
                if any(w != 1 for w in weights.values())
                else ""
            )
        )
    members = st.get("members")
    if members:
        rows = [
            [
                name,
                m.get("state", "?"),
                _ms(m.get("last_heard_ms")),
                m.get("boot_id") or "-",
                ",".join(m.get("view") or []) or "-",
                "yes" if m.get("draining") else "",
            ]
            for name, m in members.items()
        ]
        lines += ["", render_table(["member", "state", "heard", "boot", "view", "draining"], rows)]
    for name, g in st["groups"].items():
        own = g["owned"]
        ranges = own["ranges"]
        shown = ", ".join(f"{lo}-{hi}" for lo, hi in ranges[:6])
        if len(ranges) > 6:
            shown += f", ... ({len(ranges)} ranges)"
        lines += [
            "",
            f"group {name}: {', '.join(g['addresses'])} hash {g['hash']}",
            "  shares: " + (", ".join(f"{m} {s}" for m, s in g["shares"].items()) or "(none)"),
            f"  owned here: {own['buckets']} buckets ({own['share']}): {shown or '-'}",
        ]
        if g.get("draining") or g.get("incoming"):
            lines.append(f"  draining {g['draining']}, incoming {g['incoming']}")
        pk = g.get("packets") or {}
        if pk:
            lines.append(
                f"  packets accepted {pk.get('accepted_packets', 0)},"
                f" dropped {pk.get('dropped_packets', 0)}"
            )
    dp = st.get("dataplane") or {}
    if dp.get("backend"):
        where = f" ({dp['mode']} XDP, program {dp['program_id']})" if dp.get("mode") else ""
        lines += ["", f"data plane: {dp['backend']}{where}"]
    k = st.get("kernel", {})
    if k.get("last_update_ms") is not None:
        lines += ["", f"kernel updates {k['updates']}, last took {k['last_update_ms']:.2f} ms"]
    return "\n".join(lines)


def _ms(v: Any) -> str:
    return "-" if v is None else f"{v:.0f}ms ago"


def run(args: argparse.Namespace) -> int:
    path = socket_path(args)
    try:
        st = request(path, "status")
    except ControlError as e:
        raise OperationError(str(e)) from None
    st.pop("ok", None)
    if args.json:
        print_json(st)
    else:
        print(to_text(st))
    return 0
