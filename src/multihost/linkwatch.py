"""The cluster link's state, and a netlink socket that says when it may have changed.

Owns: :func:`link_up` (sysfs ``operstate`` of this namespace's interface) and
:class:`LinkWatch`, an ``rtnetlink`` socket subscribed to link notifications
(``RTMGRP_LINK``): readable whenever any link of the namespace changes, so the agent looks
at the link only then instead of polling it.  Must not: decide anything about membership
or fencing (the membership glue does), or parse the notifications (a change of any link
just triggers a fresh :func:`link_up`).
"""

from __future__ import annotations

import socket

RTMGRP_LINK = 0x1


def link_up(interface: str) -> bool:
    """Whether the interface can carry traffic (sysfs operstate; the netns's own /sys)."""
    try:
        with open(f"/sys/class/net/{interface}/operstate") as f:
            state = f.read().strip()
    except OSError:
        return False
    return state in ("up", "unknown")


class LinkWatch:
    """Non-blocking rtnetlink socket; :meth:`drain` empties it (call when readable)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            self.sock.bind((0, RTMGRP_LINK))
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
