"""Apply or remove a back end's per-node return routes (a :class:`~multihost.backendplan.Plan`)
on the host this runs on, through netlink (pyroute2).  Thin shell.

Owns: reading the addresses, routes and rules that matter to a plan; refusing, before
anything changes, what would clash with them (the address on another interface or with
another prefix length, another default route in a node's table, another rule for a node's
source address; removing a primary IPv4 address that would take foreign secondaries with
it); then adding exactly the missing steps in plan order (:func:`apply`, rolled back if a
step fails) or deleting exactly the present ones in reverse order (:func:`remove`).  Each
step is reported ``added``/``present`` or ``removed``/``absent``, so applying twice changes
nothing the second time and apply + remove leaves the host as it was.

Must not: decide what a back end needs (``backendplan`` does), keep state between runs, or
touch addresses, routes or rules that are not in the plan.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute

from multihost.backendplan import AddressStep, Plan, RouteStep, RuleStep, Step

RTPROT_STATIC = 4
FR_ACT_TO_TBL = 1
IFA_F_SECONDARY = 0x01
ADDED, PRESENT, REMOVED, ABSENT = "added", "present", "removed", "absent"


class BackendRoutesError(RuntimeError):
    """The plan cannot be applied or removed here (the message says why)."""


@dataclass(frozen=True)
class Outcome:
    step: Step
    result: str  # ADDED | PRESENT | REMOVED | ABSENT


def _af(version: int) -> int:
    return socket.AF_INET if version == 4 else socket.AF_INET6


def _attr(msg: Any, name: str, default: Any = None) -> Any:
    value = msg.get_attr(name)
    return default if value is None else value


class _Host:
    """What the kernel holds for one plan's interface and family (read once per call)."""

    def __init__(self, ipr: IPRoute, pl: Plan) -> None:
        self.ipr, self.plan = ipr, pl
        found = ipr.link_lookup(ifname=pl.interface)
        if not found:
            raise BackendRoutesError(
                f"no interface {pl.interface!r} on this host (backend {pl.backend!r} interface);"
                " run --apply on the back end itself"
            )
        self.index = int(found[0])
        self.names = {int(m["index"]): m.get_attr("IFLA_IFNAME") for m in ipr.get_links()}
        self.af = _af(pl.family)

    def addresses(self) -> list[tuple[int, ipaddress.IPv4Interface | ipaddress.IPv6Interface, int]]:
        out = []
        for m in self.ipr.get_addr(family=self.af):
            text = _attr(m, "IFA_LOCAL") or _attr(m, "IFA_ADDRESS")
            if text is None:
                continue
            flags = int(_attr(m, "IFA_FLAGS", m["flags"]))
            out.append((int(m["index"]), ipaddress.ip_interface(f"{text}/{m['prefixlen']}"), flags))
        return out

    def default_routes(self, table: int) -> list[tuple[str | None, int | None]]:
        """(gateway, oif) of every default route in ``table``."""
        out = []
        for m in self.ipr.get_routes(family=self.af, table=table):
            if int(_attr(m, "RTA_TABLE", m["table"])) != table or m["dst_len"] != 0:
                continue
            oif = _attr(m, "RTA_OIF")
            out.append((_attr(m, "RTA_GATEWAY"), None if oif is None else int(oif)))
        return out

    def rules(self) -> list[tuple[int, str | None, int, int, int]]:
        """(priority, source, source length, table, action) of every rule."""
        out = []
        for m in self.ipr.get_rules(family=self.af):
            table = int(_attr(m, "FRA_TABLE", m["table"]))
            prio = int(_attr(m, "FRA_PRIORITY", 0))
            out.append((prio, _attr(m, "FRA_SRC"), int(m["src_len"]), table, int(m["action"])))
        return out

    def ifname(self, index: int) -> str:
        return str(self.names.get(index, f"index {index}"))

    # ----------------------------------------------------------------------- per step
    def present(self, s: Step, *, strict: bool) -> bool:
        """Whether ``s`` is in the kernel; ``strict``: raise on a clash instead of False."""
        if isinstance(s, AddressStep):
            return self._address_present(s, strict)
        if isinstance(s, RouteStep):
            return self._route_present(s, strict)
        return self._rule_present(s, strict)

    def _address_present(self, s: AddressStep, strict: bool) -> bool:
        for index, iface, _ in self.addresses():
            if iface.ip != s.address.ip:
                continue
            if index == self.index and iface.network.prefixlen == s.address.network.prefixlen:
                return True
            if strict:
                raise BackendRoutesError(
                    f"{s.address.ip} is already configured as {iface.with_prefixlen} on "
                    f"{self.ifname(index)} (node {s.node} needs {s.address.with_prefixlen} on "
                    f"{s.interface}); remove it first"
                )
        return False

    def _route_present(self, s: RouteStep, strict: bool) -> bool:
        others = []
        for gw, oif in self.default_routes(s.table):
            if gw is not None and ipaddress.ip_address(gw) == s.gateway and oif == self.index:
                return True
            others.append(f"via {gw} dev {self.ifname(oif) if oif is not None else '?'}")
        if others and strict:
            raise BackendRoutesError(
                f"table {s.table} already has a default route ({', '.join(others)}), not node "
                f"{s.node}'s via {s.gateway} dev {s.interface}: another use of that table? "
                "choose another table_base"
            )
        return False

    def _rule_present(self, s: RuleStep, strict: bool) -> bool:
        full = s.source.max_prefixlen
        clash = []
        for prio, src, src_len, table, action in self.rules():
            if src is None or src_len != full or ipaddress.ip_address(src) != s.source:
                continue
            if prio == s.priority and table == s.table and action == FR_ACT_TO_TBL:
                return True
            clash.append(f"priority {prio} lookup {table}")
        if clash and strict:
            raise BackendRoutesError(
                f"a rule from {s.source} already exists ({', '.join(clash)}), not node "
                f"{s.node}'s 'priority {s.priority} lookup {s.table}'; remove it first"
            )
        return False

    def add(self, s: Step) -> None:
        if isinstance(s, AddressStep):
            a = s.address
            self.ipr.addr("add", index=self.index, address=str(a.ip), prefixlen=a.network.prefixlen)
        elif isinstance(s, RouteStep):
            self.ipr.route(
                "add",
                dst="0.0.0.0/0" if s.gateway.version == 4 else "::/0",
                gateway=str(s.gateway),
                oif=self.index,
                table=s.table,
                proto=RTPROT_STATIC,
                family=self.af,
            )
        else:
            self._rule("add", s)

    def delete(self, s: Step) -> None:
        if isinstance(s, AddressStep):
            a = s.address
            self.ipr.addr("del", index=self.index, address=str(a.ip), prefixlen=a.network.prefixlen)
        elif isinstance(s, RouteStep):
            self.ipr.route(
                "del",
                dst="0.0.0.0/0" if s.gateway.version == 4 else "::/0",
                gateway=str(s.gateway),
                oif=self.index,
                table=s.table,
                family=self.af,
            )
        else:
            self._rule("del", s)

    def _rule(self, verb: str, s: RuleStep) -> None:
        self.ipr.rule(
            verb,
            table=s.table,
            priority=s.priority,
            src=str(s.source),
            src_len=s.source.max_prefixlen,
            action=FR_ACT_TO_TBL,
            family=self.af,
        )

    def check_secondaries(self, removing: list[AddressStep]) -> None:
        """Deleting a primary IPv4 address deletes its secondaries too (unless the
        interface promotes them): refuse when foreign ones would go with it."""
        if self.plan.family != 4 or _promotes(self.plan.interface):
            return
        ours = {s.address.ip for s in removing}
        mine = [(i, f) for idx, i, f in self.addresses() if idx == self.index]
        for iface, flags in mine:
            if iface.ip not in ours or flags & IFA_F_SECONDARY:
                continue
            foreign = [
                j.with_prefixlen
                for j, g in mine
                if g & IFA_F_SECONDARY and j.network == iface.network and j.ip not in ours
            ]
            if foreign:
                raise BackendRoutesError(
                    f"{iface.with_prefixlen} is the primary address of {iface.network} on "
                    f"{self.plan.interface}; deleting it would delete {', '.join(foreign)} too "
                    f"(set net.ipv4.conf.{self.plan.interface}.promote_secondaries=1 first)"
                )


def _promotes(interface: str) -> bool:
    path = f"/proc/sys/net/ipv4/conf/{interface.replace('.', '/')}/promote_secondaries"
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


@contextmanager
def _host(pl: Plan) -> Iterator[_Host]:
    with IPRoute() as ipr:
        yield _Host(ipr, pl)


def _fail(verb: str, s: Step, e: Exception) -> BackendRoutesError:
    return BackendRoutesError(f"{s.command(verb)}: {e}")


def apply(pl: Plan) -> list[Outcome]:
    """Add the plan's missing steps (in order); on a failure remove what this call added
    and raise.  Idempotent: a second call reports every step ``present``."""
    with _host(pl) as host:
        present = [host.present(s, strict=True) for s in pl.steps]
        added: list[Step] = []
        try:
            for s, there in zip(pl.steps, present, strict=True):
                if not there:
                    try:
                        host.add(s)
                    except Exception as e:  # pyroute2's NetlinkError (an OSError)
                        raise _fail("add", s, e) from e
                    added.append(s)
        except BaseException:
            for s in reversed(added):
                with contextlib.suppress(Exception):  # best effort: report the first error
                    host.delete(s)
            raise
    return [Outcome(s, PRESENT if p else ADDED) for s, p in zip(pl.steps, present, strict=True)]


def remove(pl: Plan) -> list[Outcome]:
    """Delete the plan's present steps, in reverse order; report the others ``absent``."""
    steps = pl.removal()
    with _host(pl) as host:
        present = [host.present(s, strict=False) for s in steps]
        host.check_secondaries(
            [s for s, p in zip(steps, present, strict=True) if p and isinstance(s, AddressStep)]
        )
        for s, there in zip(steps, present, strict=True):
            if there:
                try:
                    host.delete(s)
                except Exception as e:  # pyroute2's NetlinkError (an OSError)
                    raise _fail("del", s, e) from e
    return [Outcome(s, REMOVED if p else ABSENT) for s, p in zip(steps, present, strict=True)]
