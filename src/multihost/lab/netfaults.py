"""Faults of the lab's cluster network: heartbeat loss and partitions, as nft rules.

Owns: one nft table named :data:`TABLE` per lab namespace it touches — ``bridge`` family
in the switch namespace (a rule there sees every copy of a multicast frame once per
egress port, so loss is independent per receiver and a partition can cut exactly the
pairs it names), ``inet`` family in a node's namespace (loss of that node's incoming and
outgoing heartbeats) — rendered from a :class:`FaultSpec` recorded in the lab's state file
(``agents.netfaults``), so ``lab status``, ``heal`` and later commands know what is on.
Every rule matches only the heartbeat port (``udp dport 7946``): client traffic to the
traffic IP is never touched, so during a partition every node still sees every client
packet (which is what makes a split brain visible).

Must not: touch a table it did not create (the agents' ``multihost``/``multihost_guard``
tables are left alone), a namespace outside the lab, or anything but heartbeats.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from multihost.lab.agents import HEARTBEAT_PORT
from multihost.lab.state import LabError, LabState
from multihost.lab.wiring import nft_script

TABLE = "mhchaos"
SWITCH = "sw"


@dataclass
class FaultSpec:
    """What is on: loss percentages per place (``sw`` or a node) and partitions."""

    loss: dict[str, int] = field(default_factory=dict)
    partitions: list[tuple[list[str], list[str]]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.loss and not self.partitions

    def to_dict(self) -> dict[str, Any]:
        return {
            "loss": dict(sorted(self.loss.items())),
            "partitions": [[list(a), list(b)] for a, b in self.partitions],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> FaultSpec:
        d = d or {}
        loss = {str(k): int(v) for k, v in dict(d.get("loss") or {}).items()}
        parts = [([str(x) for x in a], [str(x) for x in b]) for a, b in d.get("partitions") or []]
        return cls(loss, parts)


def current(state: LabState) -> FaultSpec:
    return FaultSpec.from_dict(state.agents.get("netfaults"))


def _names(items: Iterable[str]) -> str:
    return "{ " + ", ".join(f'"{x}"' for x in items) + " }"


def _lossy(percent: int) -> str:
    hb = f"udp dport {HEARTBEAT_PORT}"
    if percent >= 100:
        return f"{hb} counter drop"
    return f"{hb} numgen random mod 100 < {percent} counter drop"


def render_switch(state: LabState, spec: FaultSpec) -> str | None:
    """The switch namespace's table (None: nothing to do there)."""
    topo = state.topology
    port = {n.name: n.switch_port for n in topo.nodes}
    rules: list[str] = []
    hb = f"udp dport {HEARTBEAT_PORT}"
    for side_a, side_b in spec.partitions:
        a, b = [port[n] for n in side_a], [port[n] for n in side_b]
        rules.append(f"iifname {_names(a)} oifname {_names(b)} {hb} counter drop")
        rules.append(f"iifname {_names(b)} oifname {_names(a)} {hb} counter drop")
    p = spec.loss.get(SWITCH, 0)
    if p:
        rules.append(_lossy(p))
    if not rules:
        return None
    body = "\n".join(f"    {r}" for r in rules)
    return (
        f"table bridge {TABLE} {{\n  chain forward {{\n"
        f"    type filter hook forward priority 0; policy accept;\n{body}\n  }}\n}}\n"
    )


def render_node(spec: FaultSpec, node: str) -> str | None:
    """A node namespace's table: drop P % of heartbeats it receives and of those it sends."""
    p = spec.loss.get(node, 0)
    if not p:
        return None
    rule = _lossy(p)
    chains = "".join(
        f"  chain {hook} {{\n    type filter hook {hook} priority 0; policy accept;\n"
        f"    {rule}\n  }}\n"
        for hook in ("input", "output")
    )
    return f"table inet {TABLE} {{\n{chains}}}\n"


def _replace(netns: str, family: str, table: str | None) -> None:
    """Atomically replace (or remove, with ``table`` None) our table in ``netns``."""
    script = f"add table {family} {TABLE}\ndelete table {family} {TABLE}\n"
    nft_script(netns, script + (table or ""))


def apply(state: LabState, spec: FaultSpec) -> FaultSpec:
    """Make the lab's namespaces carry exactly ``spec``, then record it."""
    topo = state.topology
    _replace(topo.switch.netns, "bridge", render_switch(state, spec))
    for n in topo.nodes:
        _replace(n.netns, "inet", render_node(spec, n.name))
    if spec.empty:
        state.agents.pop("netfaults", None)
    else:
        state.agents["netfaults"] = spec.to_dict()
    state.save()
    return spec


def _check_nodes(state: LabState, nodes: Iterable[str]) -> None:
    members = state.topology.members
    for n in nodes:
        if n not in members:
            raise LabError(f"unknown node {n!r} (nodes: {','.join(members)})")


def set_loss(state: LabState, percent: int, where: Sequence[str] = (SWITCH,)) -> FaultSpec:
    """Drop ``percent`` % of heartbeats at each of ``where`` (``sw``: every receiver
    independently, at the switch; a node: what it sends and what it receives)."""
    if not 0 <= percent <= 100:
        raise LabError(f"loss {percent}% is outside 0..100")
    _check_nodes(state, [w for w in where if w != SWITCH])
    spec = current(state)
    for w in where:
        if percent:
            spec.loss[w] = percent
        else:
            spec.loss.pop(w, None)
    return apply(state, spec)


def partition(state: LabState, side_a: Sequence[str], side_b: Sequence[str]) -> FaultSpec:
    """Drop every heartbeat between ``side_a`` and ``side_b`` (both directions)."""
    if not side_a or not side_b:
        raise LabError("a partition needs two non-empty sides")
    _check_nodes(state, [*side_a, *side_b])
    if set(side_a) & set(side_b):
        raise LabError(f"nodes on both sides: {','.join(sorted(set(side_a) & set(side_b)))}")
    spec = current(state)
    spec.partitions.append((list(side_a), list(side_b)))
    return apply(state, spec)


def heal(state: LabState) -> FaultSpec:
    """Remove every loss rule and partition (also tables left by an interrupted run)."""
    return apply(state, FaultSpec())


def counters(state: LabState) -> dict[str, int]:
    """Packets dropped so far by our rules, per namespace (``sw`` or node name)."""
    topo = state.topology
    out: dict[str, int] = {}
    places = [(SWITCH, topo.switch.netns, "bridge")]
    places += [(n.name, n.netns, "inet") for n in topo.nodes]
    for name, netns, family in places:
        proc = subprocess.run(
            ["ip", "netns", "exec", netns, "nft", "list", "table", family, TABLE],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            continue
        total = 0
        for line in proc.stdout.splitlines():
            words = line.split()
            if "packets" in words:
                total += int(words[words.index("packets") + 1])
        out[name] = total
    return out
