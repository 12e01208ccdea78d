"""What a probe of a transparent lab measures behind the nodes.

Owns: the snapshot of the nodes' reply counters (``held``/``closed``/``stray``, see
:mod:`multihost.lab.backbuild`) and of the back ends' access logs before a probe, and the
``transparency`` object of ``lab probe --json`` after it: per back end the requests it
answered, whether each back end saw the client's real address (per connection, from its
answer, and per request in its ``$remote_addr`` log), and the replies that reached a node
without the connection (``stray_replies``, counted on every node's back-end interface).

Must not: send traffic (the probe worker does) or change the lab.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from multihost.lab import backbuild
from multihost.lab.state import LabState


@dataclass
class Snapshot:
    counters: dict[str, dict[str, int]] = field(default_factory=dict)
    log_offsets: dict[str, int] = field(default_factory=dict)


def snapshot(state: LabState) -> Snapshot | None:
    """None unless the lab is transparent."""
    bn = state.topology.backnet
    if bn is None:
        return None
    offsets = {}
    for b in bn.backends:
        try:
            offsets[b.name] = backbuild.backend_log(state, b.name).stat().st_size
        except FileNotFoundError:
            offsets[b.name] = 0
    return Snapshot(backbuild.reply_counters(state), offsets)


def _log_lines(state: LabState, backend: str, offset: int) -> list[str]:
    try:
        with open(backbuild.backend_log(state, backend), "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return []


def measure(
    state: LabState,
    before: Snapshot,
    rows: list[dict[str, Any]],
    flows: list[tuple[str, int]],
) -> dict[str, Any]:
    """The ``transparency`` object: compare what the back ends saw with the flows sent."""
    bn = state.topology.backnet
    assert bn is not None
    after = backbuild.reply_counters(state)
    replies = {
        n: {k: v - before.counters.get(n, {}).get(k, 0) for k, v in after[n].items()} for n in after
    }
    served: Counter[str] = Counter()
    seen_client = seen_port = seen_other = missing = 0
    for row in rows:
        if row.get("outcome") != "answered":
            continue
        saddr, sport = flows[int(row["i"])]
        seen = str(row.get("seen") or "")
        if not row.get("backend") or ":" not in seen:
            missing += 1
            continue
        served[str(row["backend"])] += 1
        addr, _, port = seen.rpartition(":")
        if addr == saddr:
            seen_client += 1
            seen_port += int(port == str(sport))
        else:
            seen_other += 1
    clients = {a for a, _ in flows}
    logs: dict[str, dict[str, int]] = {}
    for b in bn.backends:
        lines = _log_lines(state, b.name, before.log_offsets.get(b.name, 0))
        addrs = [line.split(" ", 1)[0] for line in lines if line.strip()]
        logs[b.name] = {
            "requests": len(addrs),
            "client": sum(a in clients for a in addrs),
            "other": sum(a not in clients for a in addrs),
        }
    return {
        "return": bn.mode.value,
        "backends": {b.name: served.get(b.name, 0) for b in bn.backends},
        "seen_client": seen_client,
        "seen_client_port": seen_port,
        "seen_other": seen_other,
        "no_backend": missing,
        "backend_log": logs,
        "replies": replies,
        "stray_replies": sum(r["stray"] for r in replies.values()),
    }


def clean(transparency: dict[str, Any]) -> bool:
    """Every answer came from a back end that saw the client's address, every back end's
    log names only clients, and no reply reached a node without its connection."""
    logs = transparency["backend_log"].values()
    return (
        transparency["seen_other"] == 0
        and transparency["no_backend"] == 0
        and transparency["stray_replies"] == 0
        and all(v["other"] == 0 for v in logs)
    )
