"""The cluster multicast socket: heartbeats in and out on the cluster interface.

Owns: creating the UDP socket bound to the group and port (IPv4 or IPv6), joining the group
on the cluster interface only, hop limit 1, no loopback of our own datagrams, source address
= this node's address (an IPv6 link-local one is scoped to the cluster interface).  Must
not: parse or build heartbeats (``membership.wire`` does).
"""

from __future__ import annotations

import ipaddress
import socket
import struct

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def open_multicast(group: IPAddress, port: int, interface: str, source: IPAddress) -> socket.socket:
    """A non-blocking socket joined to ``group`` on ``interface``; datagrams sent on it
    leave ``interface`` with source ``source``.  ``group`` and ``source`` share a family."""
    if group.version != source.version:
        raise ValueError(f"group {group} and source {source} are of different families")
    ifindex = socket.if_nametoindex(interface)
    family = socket.AF_INET if group.version == 4 else socket.AF_INET6
    s = socket.socket(family, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Only this interface's traffic for this group (not other sockets' groups).
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        if group.version == 4:
            s.bind((str(group), port))
            mreqn = struct.pack("4s4si", group.packed, source.packed, ifindex)
            s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        else:
            s.bind((str(group), port, 0, ifindex))
            mreq = struct.pack("16sI", group.packed, ifindex)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 1)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
            # The source of what we send: the node address (IPV6_PKTINFO per socket).
            pktinfo = struct.pack("16sI", source.packed, ifindex)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, pktinfo)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY, 6)  # heartbeats first
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


def destination(
    group: IPAddress, port: int, interface: str
) -> tuple[str, int] | tuple[str, int, int, int]:
    """The ``sendto`` address of ``group`` (IPv6: scoped to ``interface``)."""
    if group.version == 4:
        return (str(group), port)
    return (str(group), port, 0, socket.if_nametoindex(interface))
