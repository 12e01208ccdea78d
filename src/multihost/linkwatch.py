"""The cluster link's state, and a netlink socket that says when it may have changed.

Owns: :func:`link_up` (sysfs ``operstate`` of this namespace's interface), :func:`not_ready`
(whether the link can carry this node's replies: up, and for IPv6 no duplicate address
detection still holding every link-local address of the interface), and
:class:`LinkWatch`, an ``rtnetlink`` socket subscribed to link and IPv6 address
notifications (``RTMGRP_LINK``, ``RTMGRP_IPV6_IFADDR``): readable whenever any link or
IPv6 address of the namespace changes (a finished DAD is an address change), so the agent
looks at the link only then instead of polling it.  Must not: decide anything about
membership or fencing (the membership glue does), or parse the notifications (a change
just triggers a fresh :func:`not_ready`).

Why IPv6 needs more than "up": a node answers an IPv6 client from a traffic IP on ``lo``.
To resolve the client's MAC the kernel sends a Neighbor Solicitation, and with a source
address that is not on the cluster interface (the traffic IP) it takes the interface's
link-local address -- and sends *nothing* while that address is tentative
(``ndisc_send_ns`` -> ``ipv6_get_lladdr(..., IFA_F_TENTATIVE | IFA_F_OPTIMISTIC)``).  When
a link comes back up (also with ``keep_addr_on_down``: kept addresses are made tentative
at link down) DAD re-runs for 1-2 s (a random delay up to ``rtr_solicit_delay``, then
``dad_transmits`` x ``retrans_time``), and the link's neighbour cache was flushed at link
down.  A node that took flows in that window accepted the SYN but its SYN-ACK waited in
the neighbour queue until DAD ended: connects took 1-2 s, and when the bucket moved
meanwhile another node answered the client's SYN retransmission and both answered
(``lab chaos --ipv6``).  IPv4 (ARP) has no such window.
"""

from __future__ import annotations

import socket

RTMGRP_LINK = 0x1
RTMGRP_IPV6_IFADDR = 0x100
IF_INET6 = "/proc/net/if_inet6"
IPV6_ADDR_LINKLOCAL = 0x20  # the scope column of /proc/net/if_inet6
IFA_F_OPTIMISTIC = 0x04
IFA_F_DADFAILED = 0x08
IFA_F_TENTATIVE = 0x40


def link_up(interface: str) -> bool:
    """Whether the interface can carry traffic (sysfs operstate; the netns's own /sys)."""
    try:
        with open(f"/sys/class/net/{interface}/operstate") as f:
            state = f.read().strip()
    except OSError:
        return False
    return state in ("up", "unknown")


def dad_pending(if_inet6: str, interface: str) -> bool:
    """Whether ``interface`` has no usable link-local address yet because duplicate
    address detection still runs on one (``if_inet6``: the text of ``/proc/net/if_inet6``:
    address, ifindex, prefix length, scope, flags in hex, then the interface name).

    A usable link-local address (neither tentative nor optimistic) makes it ready; one that
    failed DAD is not waited for (it never becomes usable: nothing to wait for); no
    link-local address at all (``addr_gen_mode`` none, IPv6 off) neither.
    """
    usable = pending = False
    for line in if_inet6.splitlines():
        cols = line.split()
        if len(cols) != 6 or cols[5] != interface:
            continue
        try:
            scope, flags = int(cols[3], 16), int(cols[4], 16)
        except ValueError:
            continue
        if scope != IPV6_ADDR_LINKLOCAL:
            continue
        if not flags & (IFA_F_TENTATIVE | IFA_F_OPTIMISTIC):
            usable = True
        elif not flags & IFA_F_DADFAILED:
            pending = True
    return pending and not usable


def not_ready(interface: str, ipv6: bool) -> str | None:
    """Why the cluster link cannot carry this node's replies now (None: it can).
    ``ipv6``: the node serves IPv6 traffic IPs or heartbeats over IPv6."""
    if not link_up(interface):
        return "cluster link down"
    if ipv6:
        try:
            with open(IF_INET6, encoding="ascii") as f:
                text = f.read()
        except OSError:  # no IPv6 in this kernel or namespace: nothing to wait for
            return None
        if dad_pending(text, interface):
            return f"IPv6 duplicate address detection running on {interface}"
    return None


class LinkWatch:
    """Non-blocking rtnetlink socket; :meth:`drain` empties it (call when readable)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            self.sock.bind((0, RTMGRP_LINK | RTMGRP_IPV6_IFADDR))
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise

    def fileno(self) -> int:
        return self.sock.fileno()

    def drain(self) -> None:
        """Read every pending notification (an overrun, ENOBUFS, counts as a change too)."""
        while True:
            try:
                self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ENOBUFS: notifications were lost; the caller re-reads anyway
                continue

    def close(self) -> None:
        self.sock.close()
