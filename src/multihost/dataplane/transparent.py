"""The nodes' transparent-proxy plumbing, and its exact undo.  Thin shell.

A node that proxies with the client's own address (``transparent = true``: HAProxy
``source 0.0.0.0 usesrc client``, nginx ``proxy_bind $remote_addr transparent``) receives the
back ends' replies addressed to the *client*, an address that is not local.  The standard
recipe (the kernel's ``Documentation/networking/tproxy.rst``) delivers them to the proxy's
socket instead of forwarding them:

* nft: ``socket transparent 1 meta mark set MARK`` at prerouting (the table
  :data:`~multihost.dataplane.rulesettables.TRANSPARENT_TABLE`, rendered by
  :func:`~multihost.dataplane.rulesettables.render_transparent_table`);
* ``ip rule add fwmark MARK lookup TABLE priority PRIORITY`` (IPv4 and/or IPv6);
* ``ip route add local 0.0.0.0/0 dev lo table TABLE`` (``local ::/0`` for IPv6).

Owns: applying exactly that (``[transparency]``: mark, table, priority; families of the
transparent groups' traffic IPs) and :meth:`TransparentSetup.restore`, which removes only
what :meth:`TransparentSetup.apply` added, so the host's rules, routes and ruleset are
afterwards what they were before.  A rule or route already in place (the operator's) is
kept and left alone; a table that holds other routes is refused (it is someone else's).

Must not: touch addresses, links, sysctls (``hostsetup``) or the data plane's tables.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute

from multihost.dataplane.nft import Nft, NftError, netns_entered
from multihost.dataplane.rulesettables import TRANSPARENT_TABLE, render_transparent_table

FR_ACT_TO_TBL = 1
RTN_LOCAL = 2
RT_SCOPE_HOST = 254


class TransparentSetupError(RuntimeError):
    """The plumbing cannot be applied as configured (the message says what to change)."""


@dataclass(frozen=True)
class _Rule:
    family: int
    mark: int
    table: int
    priority: int


@dataclass(frozen=True)
class _Route:
    family: int
    table: int


def _af(family: int) -> int:
    return socket.AF_INET if family == 4 else socket.AF_INET6


def _attr(msg: Any, name: str, default: Any = None) -> Any:
    value = msg.get_attr(name)
    return default if value is None else value


class TransparentSetup:
    """``socket transparent`` mark, fwmark rule and ``local`` route for ``families``."""

    def __init__(
        self,
        mark: int,
        table: int,
        priority: int,
        families: Iterable[int],
        *,
        netns: str | None = None,
        loopback: str = "lo",
        nft_table: str = TRANSPARENT_TABLE,
    ) -> None:
        self.mark, self.table, self.priority = mark, table, priority
        self.families = tuple(sorted(set(families)))
        self.netns = netns
        self.loopback = loopback
        self.nft_table = nft_table
        self._script = render_transparent_table(mark, nft_table)  # refuses a bad mark early
        self._rules: list[_Rule] = []
        self._routes: list[_Route] = []
        self._nft_added = False

    def apply(self) -> None:
        """Add what is missing; on failure undo this call's additions and raise."""
        try:
            with netns_entered(self.netns):
                self._apply()
        except BaseException:
            self.restore()
            raise

    def _apply(self) -> None:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=self.loopback)
            if not found:
                raise TransparentSetupError(f"no interface {self.loopback!r}")
            lo = int(found[0])
            for fam in self.families:
                route = _Route(fam, self.table)
                if not self._route_present(ipr, fam, lo):
                    ipr.route(
                        "add",
                        dst="0.0.0.0/0" if fam == 4 else "::/0",
                        type=RTN_LOCAL,
                        scope=RT_SCOPE_HOST,
                        oif=lo,
                        table=self.table,
                        family=_af(fam),
                    )
                    self._routes.append(route)
            for fam in self.families:
                rule = _Rule(fam, self.mark, self.table, self.priority)
                if not self._rule_present(ipr, fam):
                    ipr.rule(
                        "add",
                        fwmark=self.mark,
                        table=self.table,
                        priority=self.priority,
                        action=FR_ACT_TO_TBL,
                        family=_af(fam),
                    )
                    self._rules.append(rule)
        with Nft(self.netns) as nft:
            existed = self._nft_present(nft)
            if not existed:
                nft.run(self._script)
                self._nft_added = True

    def _route_present(self, ipr: IPRoute, fam: int, lo: int) -> bool:
        others = []
        for m in ipr.get_routes(family=_af(fam), table=self.table):
            if int(_attr(m, "RTA_TABLE", m["table"])) != self.table:
                continue
            oif = _attr(m, "RTA_OIF")
            if m["dst_len"] == 0 and m["type"] == RTN_LOCAL and oif == lo:
                return True
            others.append(f"{_attr(m, 'RTA_DST', 'default')}/{m['dst_len']}")
        if others:
            raise TransparentSetupError(
                f"routing table {self.table} already holds IPv{fam} routes ({', '.join(others)})"
                ": another use of that table? choose another transparency.table"
            )
        return False

    def _rule_present(self, ipr: IPRoute, fam: int) -> bool:
        for m in ipr.get_rules(family=_af(fam)):
            if (
                int(_attr(m, "FRA_FWMARK", 0)) == self.mark
                and int(_attr(m, "FRA_TABLE", m["table"])) == self.table
                and int(_attr(m, "FRA_PRIORITY", 0)) == self.priority
            ):
                return True
        return False

    def _nft_present(self, nft: Nft) -> bool:
        try:
            nft.run(f"list table inet {self.nft_table}")
        except NftError:
            return False
        return True

    def restore(self) -> None:
        """Remove what :meth:`apply` added (rules, then routes, then the nft table).
        Idempotent; safe after a failed apply."""
        with netns_entered(self.netns):
            if self._rules or self._routes:
                with IPRoute() as ipr:
                    lo = ipr.link_lookup(ifname=self.loopback)
                    for rule in reversed(self._rules):
                        _ignore_gone(
                            lambda r=rule: ipr.rule(
                                "del",
                                fwmark=r.mark,
                                table=r.table,
                                priority=r.priority,
                                action=FR_ACT_TO_TBL,
                                family=_af(r.family),
                            )
                        )
                    self._rules.clear()
                    for route in reversed(self._routes):
                        _ignore_gone(
                            lambda r=route: ipr.route(
                                "del",
                                dst="0.0.0.0/0" if r.family == 4 else "::/0",
                                type=RTN_LOCAL,
                                scope=RT_SCOPE_HOST,  # IPv4 matches it (ESRCH without)
                                oif=lo[0] if lo else None,
                                table=r.table,
                                family=_af(r.family),
                            )
                        )
                    self._routes.clear()
        if self._nft_added:
            with Nft(self.netns) as nft:
                nft.run(f"add table inet {self.nft_table}\ndelete table inet {self.nft_table}\n")
            self._nft_added = False

    def remove_leftovers(self) -> list[str]:
        """What a killed agent left (``multihost cleanup``): delete the rule, the route and
        the table that match this configuration exactly; returns what was removed."""
        removed: list[str] = []
        with netns_entered(self.netns), IPRoute() as ipr:
            found = ipr.link_lookup(ifname=self.loopback)
            lo = int(found[0]) if found else -1
            for fam in self.families:
                if self._rule_present(ipr, fam):
                    self._rules.append(_Rule(fam, self.mark, self.table, self.priority))
                    removed.append(f"ipv{fam} rule fwmark {self.mark:#x} lookup {self.table}")
                try:
                    present = self._route_present(ipr, fam, lo)
                except TransparentSetupError:
                    present = False  # other routes: not ours to touch
                if present:
                    self._routes.append(_Route(fam, self.table))
                    removed.append(f"ipv{fam} local default dev lo table {self.table}")
        with Nft(self.netns) as nft:
            if self._nft_present(nft):
                self._nft_added = True
                removed.append(f"nft table inet {self.nft_table}")
        self.restore()
        return removed

    def describe(self) -> dict[str, Any]:
        return {
            "mark": self.mark,
            "table": self.table,
            "priority": self.priority,
            "families": list(self.families),
            "nft_table": self.nft_table,
        }


def _ignore_gone(fn: Any) -> None:
    import errno

    try:
        fn()
    except Exception as e:  # pyroute2's NetlinkError
        if getattr(e, "code", None) not in (errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL):
            raise
