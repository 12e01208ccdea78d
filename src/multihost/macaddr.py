"""Multicast MAC addresses derived from the cluster multicast group.  Pure.

Owns: the mapping group IP -> Ethernet multicast MAC (RFC 1112 §6.4 for IPv4:
``01:00:5e`` + low 23 bits; RFC 2464 §7 for IPv6: ``33:33`` + low 32 bits), and MAC text
formatting/parsing.  Every member answers ARP for its traffic IPs with this MAC, so a switch
floods (or, with IGMP snooping, multicasts) client packets to every member.

Must not: open sockets or look at interfaces.
"""

from __future__ import annotations

import ipaddress


class MacError(ValueError):
    """Not a multicast group, or not a MAC address."""


def multicast_mac(group: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """The 6-byte Ethernet multicast address for an IPv4 or IPv6 multicast group."""
    try:
        addr = ipaddress.ip_address(group)
    except ValueError as e:
        raise MacError(str(e)) from None
    if not addr.is_multicast:
        raise MacError(f"{addr} is not a multicast address")
    raw = addr.packed
    if addr.version == 4:
        return bytes((0x01, 0x00, 0x5E, raw[1] & 0x7F, raw[2], raw[3]))
    return b"\x33\x33" + raw[12:16]


def format_mac(mac: bytes) -> str:
    if len(mac) != 6:
        raise MacError(f"a MAC address has 6 bytes, got {len(mac)}")
    return ":".join(f"{b:02x}" for b in mac)


def parse_mac(text: str) -> bytes:
    parts = text.strip().split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise MacError(f"{text!r} is not a MAC address like 01:00:5e:00:00:01")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise MacError(f"{text!r} is not a MAC address like 01:00:5e:00:00:01") from None


def is_multicast_mac(mac: bytes) -> bool:
    return len(mac) == 6 and bool(mac[0] & 0x01)
