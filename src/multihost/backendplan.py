"""What one back end needs for per-node return routes: the exact steps, as text and JSON.

Owns: turning a :class:`~multihost.backends.BackendConfig` into its :class:`Plan` — per node,
in slot order, the address on the back end's interface, the default route of the node's
table via the node's gateway, and the source rule that selects that table — and rendering
it as ``ip`` commands an operator can paste (``ip -4``/``ip -6``; the removal is the same
steps in reverse) and as JSON.  The order is the apply order: a node's rule comes after its
table's route, so no reply is ever routed into an empty table.

Must not: touch the network or the kernel (``multihost.dataplane.backendroutes`` applies a
plan); nothing here reads files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from multihost.backends import BackendConfig, IPInterface, ReturnPath
from multihost.config import IPAddress

#: ``ip route ... proto static``: what the applier sets too (RTPROT_STATIC).
ROUTE_PROTO = "static"


@dataclass(frozen=True)
class AddressStep:
    """``address`` on ``interface`` (the node's own address on the back end)."""

    node: str
    interface: str
    address: IPInterface

    kind = "address"

    def command(self, verb: str = "add") -> str:
        v = self.address.version
        return f"ip -{v} addr {verb} {self.address.with_prefixlen} dev {self.interface}"

    def fields(self) -> dict[str, Any]:
        return {"interface": self.interface, "address": self.address.with_prefixlen}


@dataclass(frozen=True)
class RouteStep:
    """``default via gateway dev interface`` in ``table``."""

    node: str
    interface: str
    table: int
    gateway: IPAddress

    kind = "route"

    def command(self, verb: str = "add") -> str:
        v = self.gateway.version
        return (
            f"ip -{v} route {verb} default via {self.gateway} dev {self.interface} "
            f"table {self.table} proto {ROUTE_PROTO}"
        )

    def fields(self) -> dict[str, Any]:
        return {
            "interface": self.interface,
            "table": self.table,
            "destination": "default",
            "gateway": str(self.gateway),
        }


@dataclass(frozen=True)
class RuleStep:
    """``from source lookup table priority priority``."""

    node: str
    source: IPAddress
    table: int
    priority: int

    kind = "rule"

    def command(self, verb: str = "add") -> str:
        v = self.source.version
        return (
            f"ip -{v} rule {verb} from {self.source} lookup {self.table} priority {self.priority}"
        )

    def fields(self) -> dict[str, Any]:
        return {"source": str(self.source), "table": self.table, "priority": self.priority}


Step = AddressStep | RouteStep | RuleStep


@dataclass(frozen=True)
class Plan:
    """Everything one back end needs, in apply order (remove: :meth:`removal`)."""

    backend: str
    interface: str
    family: int
    paths: tuple[ReturnPath, ...]
    steps: tuple[Step, ...]

    def removal(self) -> tuple[Step, ...]:
        """The steps in remove order (the reverse: rules first, addresses last)."""
        return tuple(reversed(self.steps))


def plan(backend: BackendConfig) -> Plan:
    """The steps for ``backend``: per node in slot order, address, route, rule."""
    steps: list[Step] = []
    for p in backend.paths:
        steps.append(AddressStep(p.node, backend.interface, p.address))
        steps.append(RouteStep(p.node, backend.interface, p.table, p.gateway))
        steps.append(RuleStep(p.node, p.address.ip, p.table, p.priority))
    return Plan(backend.name, backend.interface, backend.family, backend.paths, tuple(steps))


def render_text(pl: Plan, *, remove: bool = False) -> str:
    """The plan as ``ip`` commands (with ``#`` comments), one per line, to paste as root
    on the back end.  ``remove``: the commands that undo it, in reverse order."""
    verb = "del" if remove else "add"
    what = "remove" if remove else "set up"
    lines = [
        f"# back end {pl.backend!r}: {what} per-node return routes on {pl.interface}",
        "# (replies from node N's address leave via node N's backend_gateway)",
    ]
    steps = pl.removal() if remove else pl.steps
    node = None
    for s in steps:
        if s.node != node:
            node = s.node
            p = next(p for p in pl.paths if p.node == node)
            lines.append(
                f"# node {node} (slot {p.slot}): from {p.address.ip} via {p.gateway}, "
                f"table {p.table}, priority {p.priority}"
            )
        lines.append(s.command(verb))
    return "\n".join(lines) + "\n"


def step_json(s: Step, verb: str = "add") -> dict[str, Any]:
    return {"kind": s.kind, "node": s.node, **s.fields(), "command": s.command(verb)}


def render_json(pl: Plan, *, remove: bool = False) -> dict[str, Any]:
    """The plan as one JSON-ready object (steps in the order they are applied/removed)."""
    verb = "del" if remove else "add"
    return {
        "backend": pl.backend,
        "interface": pl.interface,
        "family": pl.family,
        "nodes": [
            {
                "node": p.node,
                "slot": p.slot,
                "address": p.address.with_prefixlen,
                "gateway": str(p.gateway),
                "table": p.table,
                "priority": p.priority,
            }
            for p in pl.paths
        ],
        "steps": [step_json(s, verb) for s in (pl.removal() if remove else pl.steps)],
    }
