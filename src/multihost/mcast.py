"""The cluster multicast socket: heartbeats in and out on the cluster interface.

Owns: creating the UDP socket bound to the group and port, joining the group on the
cluster interface only, TTL 1, no loopback of our own datagrams, source address = this
node's address.  Must not: parse or build heartbeats (``membership.wire`` does).
"""

from __future__ import annotations

import ipaddress
import socket
import struct


def open_multicast(
    group: ipaddress.IPv4Address, port: int, interface: str, source: ipaddress.IPv4Address
) -> socket.socket:
    ifindex = socket.if_nametoindex(interface)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Only this interface's traffic for this group (not other sockets' groups).
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        s.bind((str(group), port))
        mreqn = struct.pack("4s4si", group.packed, source.packed, ifindex)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY, 6)  # heartbeats first
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s
