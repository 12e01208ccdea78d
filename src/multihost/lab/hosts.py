"""A lab host (node or client): one namespace with one interface on a switch, and its JSON form.

Owns: the :class:`Host` record and its ``to_dict``/``from_dict`` helpers.  Must not: create,
read or delete anything (pure; :mod:`multihost.lab.topology` describes whole labs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Host:
    """A node or client: one namespace with one interface on the switch."""

    name: str
    role: str  # "node" | "client"
    netns: str
    interface: str
    switch_port: str
    mac: str
    address: str
    prefixlen: int
    extra_addresses: tuple[str, ...] = ()
    #: IPv6 addresses (dual-stack labs), primary first; prefix length ``SUBNET6``'s.
    addresses6: tuple[str, ...] = ()

    @property
    def addresses(self) -> tuple[str, ...]:
        """The IPv4 addresses, primary first."""
        return (self.address, *self.extra_addresses)

    @property
    def address6(self) -> str | None:
        return self.addresses6[0] if self.addresses6 else None

    def sources(self, family: int) -> tuple[str, ...]:
        """The addresses of one family (4 or 6), primary first."""
        return self.addresses if family == 4 else self.addresses6


def host_dict(h: Host) -> dict[str, Any]:
    return {
        "name": h.name,
        "role": h.role,
        "netns": h.netns,
        "interface": h.interface,
        "switch_port": h.switch_port,
        "mac": h.mac,
        "address": h.address,
        "prefixlen": h.prefixlen,
        "extra_addresses": list(h.extra_addresses),
        "addresses6": list(h.addresses6),
    }


def host_from(d: dict[str, Any]) -> Host:
    return Host(
        name=str(d["name"]),
        role=str(d["role"]),
        netns=str(d["netns"]),
        interface=str(d["interface"]),
        switch_port=str(d["switch_port"]),
        mac=str(d["mac"]),
        address=str(d["address"]),
        prefixlen=int(d["prefixlen"]),
        extra_addresses=tuple(str(a) for a in d["extra_addresses"]),
        addresses6=tuple(str(a) for a in d.get("addresses6", ())),
    )
