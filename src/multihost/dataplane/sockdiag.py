"""Which TCP connections this node still holds: a sock_diag dump of the local TCP sockets.

Owns: one ``NETLINK_SOCK_DIAG`` ``SOCK_DIAG_BY_FAMILY`` dump per family (AF_INET, then
AF_INET6) of the TCP sockets of the calling thread's network namespace, every state but
LISTEN and the finished TIME_WAIT/CLOSE, decoded here with ``struct``; keeping the sockets
whose local address is a traffic IP; and handing them over in :mod:`.conntrack`'s row shape
from the client's point of view, so :func:`.conntrack.buckets_in_use` maps them to buckets
unchanged.  This is the XDP backend's replacement for the conntrack probe (an XDP node has
no conntrack entries for its traffic, but its TCP sockets are the connections it serves).

Must not: change any socket or kernel state (a read-only probe; it needs no privileges
beyond being in the namespace), or run on the event loop: it blocks on netlink I/O, so
callers run it in a worker thread (``asyncio.to_thread``).

Layout (``include/uapi/linux/inet_diag.h``): the request is ``struct inet_diag_req_v2``
(family, protocol, ext, pad, ``idiag_states`` bitmask, an all-zero ``inet_diag_sockid``);
each reply is a ``struct inet_diag_msg``: family, state, timer, retrans, the sockid
(``sport``/``dport`` big-endian, ``src``/``dst`` 16 bytes each: an IPv4 address in the
first 4), then expires, rqueue, wqueue, uid, inode.  An AF_INET6 socket carrying an IPv4
connection reports ``::ffff:a.b.c.d``; rows give those as IPv4.
"""

from __future__ import annotations

import functools
import os
import socket
import struct
from collections.abc import Container
from ipaddress import IPv4Address, IPv6Address

from multihost.dataplane.conntrack import Row
from multihost.dataplane.nfcounters import (
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG,
    NLMSG_DONE,
    NLMSG_ERROR,
    dump,
)

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
# TCP socket states (include/net/tcp_states.h).
(
    TCP_ESTABLISHED,
    TCP_SYN_SENT,
    TCP_SYN_RECV,
    TCP_FIN_WAIT1,
    TCP_FIN_WAIT2,
    TCP_TIME_WAIT,
    TCP_CLOSE,
    TCP_CLOSE_WAIT,
    TCP_LAST_ACK,
    TCP_LISTEN,
    TCP_CLOSING,
    TCP_NEW_SYN_RECV,
) = range(1, 13)
#: States that are not a held connection: listeners and finished connections.
SKIPPED_STATES = frozenset({TCP_LISTEN, TCP_TIME_WAIT, TCP_CLOSE})
#: ``idiag_states``: every state (NEW_SYN_RECV: request sockets) except the skipped ones.
STATES = sum(1 << s for s in range(TCP_ESTABLISHED, TCP_NEW_SYN_RECV + 1)) & ~sum(
    1 << s for s in SKIPPED_STATES
)
SOCKID = struct.Struct(">HH16s16sI8s")  # sport, dport, src, dst, if, cookie (if: host order)
REQ = struct.Struct("=BBBBI")  # family, protocol, ext, pad, states; a SOCKID follows
MSG = struct.Struct("=BBBB")  # family, state, timer, retrans; SOCKID, 5 x u32 follow
MSG_SIZE = MSG.size + SOCKID.size + 20  # sizeof(struct inet_diag_msg) == 72
_MAPPED = bytes(10) + b"\xff\xff"

IPAddress = IPv4Address | IPv6Address


class SockDiagError(OSError):
    """The kernel refused the dump, or sent a malformed reply."""


def encode_request(family: int, seq: int, states: int = STATES) -> bytes:
    """``SOCK_DIAG_BY_FAMILY`` dump of the TCP sockets of ``family`` in ``states``."""
    body = REQ.pack(family, socket.IPPROTO_TCP, 0, 0, states) + bytes(SOCKID.size)
    flags = NLM_F_REQUEST | NLM_F_DUMP
    return NLMSG.pack(NLMSG.size + len(body), SOCK_DIAG_BY_FAMILY, flags, seq, 0) + body


def _address(family: int, raw: bytes) -> IPAddress:
    if family == socket.AF_INET:
        return IPv4Address(raw[:4])
    if raw[:12] == _MAPPED:
        return IPv4Address(raw[12:])
    return IPv6Address(raw)


def decode_dump(buf: bytes, out: list[Row], local: Container[IPAddress] | None = None) -> bool:
    """Append the sockets in ``buf`` (whose local address is in ``local``, when given) to
    ``out`` as ``(peer, peer port, local, local port, IPPROTO_TCP, None)``; listeners and
    TIME_WAIT/CLOSE sockets are skipped even if the kernel sent them.  True once the dump
    is complete (``NLMSG_DONE``); :class:`SockDiagError` when the kernel refused it.

    nfcounters' ``walk`` does not fit: it parses attributes after a 4-byte ``nfgenmsg``,
    where sock_diag has the 72-byte ``inet_diag_msg`` this needs."""
    off = 0
    while off + NLMSG.size <= len(buf):
        size, kind, _, _, _ = NLMSG.unpack_from(buf, off)
        if size < NLMSG.size or off + size > len(buf):
            raise SockDiagError("netlink: malformed sock_diag reply")
        if kind == NLMSG_DONE:
            return True
        if kind == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", buf, off + NLMSG.size)
            if code:
                raise SockDiagError(-code, f"sock_diag dump refused: {os.strerror(-code)}")
        elif kind == SOCK_DIAG_BY_FAMILY:
            if size < NLMSG.size + MSG_SIZE:
                raise SockDiagError("netlink: short inet_diag_msg")
            family, state, _, _ = MSG.unpack_from(buf, off + NLMSG.size)
            sport, dport, src, dst, _, _ = SOCKID.unpack_from(buf, off + NLMSG.size + MSG.size)
            if state not in SKIPPED_STATES and family in (socket.AF_INET, socket.AF_INET6):
                here = _address(family, src)
                if local is None or here in local:
                    peer = _address(family, dst)
                    out.append((str(peer), dport, str(here), sport, socket.IPPROTO_TCP, None))
        off += (size + 3) & ~3
    return False


def dump_sockets(
    local_addresses: frozenset[IPAddress] | None = None, timeout: float = 5.0
) -> list[Row]:
    """The TCP connections of the calling thread's netns (blocking: two sock_diag dumps),
    only those whose local address is in ``local_addresses`` when given (an
    ``::ffff:a.b.c.d`` there matches as ``a.b.c.d``), as :mod:`.conntrack` rows from the
    client's side: ``(peer, peer port, local address, local port, IPPROTO_TCP, None)``."""
    local = local_addresses
    if local is not None:
        local = frozenset(
            a.ipv4_mapped if isinstance(a, IPv6Address) and a.ipv4_mapped else a for a in local
        )
    rows: list[Row] = []
    for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), 1):
        decode = functools.partial(decode_dump, out=rows, local=local)
        dump(encode_request(family, seq), decode, timeout, protocol=NETLINK_SOCK_DIAG)
    return rows
