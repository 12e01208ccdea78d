"""UDP echo service of a lab node: answers each datagram with ``<node name>\\n<payload>``.

Run as ``python -m multihost.lab.udpecho --name A --port 7`` inside the node's namespace
(``multihost lab up`` does).  It binds the wildcard address, so it serves the node's own
address and the traffic IP alike, and replies *from the address the datagram was sent to*
(``IP_PKTINFO``), so a client connected to the traffic IP accepts the reply.  With ``--ipv6``
a second, IPv6-only socket on ``[::]`` does the same with ``IPV6_PKTINFO``.

Must not: reply to anything but the datagram's sender, or open any other socket.
"""

from __future__ import annotations

import argparse
import contextlib
import selectors
import signal
import socket
import struct
import sys
from collections.abc import Sequence
from types import FrameType

#: ``IP_PKTINFO`` from <linux/in.h> (Python does not export it on every build).
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_PKTINFO = struct.Struct("@i4s4s")  # struct in_pktinfo: ifindex, spec_dst, addr
MAX_REPLY = 65507


def reply_for(name: str, payload: bytes) -> bytes:
    return (name.encode() + b"\n" + payload)[:MAX_REPLY]


RCVBUF = 4 << 20
SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>; not exported by the socket module
_PKTINFO6 = struct.Struct("@16sI")  # struct in6_pktinfo: addr, ifindex


def _socket(family: int, bind: str, port: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # A probe keeps up to 200 datagrams in flight; with XDP on veth each one is charged a
    # full page, so the default receive buffer (~208 KiB) overflows while this
    # single-threaded server is descheduled on a loaded machine: room for a whole burst.
    # SO_RCVBUFFORCE (root, which the lab is) passes net.core.rmem_max without raising it.
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    if family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
    sock.bind((bind, port))
    return sock


def _answer(name: str, sock: socket.socket) -> None:
    size = _PKTINFO.size if sock.family == socket.AF_INET else _PKTINFO6.size
    payload, ancdata, _flags, sender = sock.recvmsg(65535, socket.CMSG_SPACE(size))
    anc = []
    for level, kind, data in ancdata:
        # Reply with the datagram's destination as source, on any interface.
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= size:
            _ifindex, _spec_dst, local = _PKTINFO.unpack_from(data)
            anc = [(socket.IPPROTO_IP, IP_PKTINFO, _PKTINFO.pack(0, local, bytes(4)))]
        elif level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= size:
            local6, _ifindex6 = _PKTINFO6.unpack_from(data)
            anc = [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, _PKTINFO6.pack(local6, 0))]
    try:
        sock.sendmsg([reply_for(name, payload)], anc, 0, sender)
    except OSError as e:  # e.g. the sender's address became unreachable
        print(f"udpecho {name}: reply to {sender} failed: {e}", file=sys.stderr, flush=True)


def serve(name: str, port: int, bind: str = "0.0.0.0", ipv6: bool = False) -> None:
    socks = [_socket(socket.AF_INET, bind, port)]
    if ipv6:
        socks.append(_socket(socket.AF_INET6, "::", port))
    with selectors.DefaultSelector() as sel:
        for sock in socks:
            sel.register(sock, selectors.EVENT_READ)
        while True:
            for key, _events in sel.select():
                _answer(name, key.fileobj)  # type: ignore[arg-type]


def _stop(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m multihost.lab.udpecho", description=__doc__)
    p.add_argument("--name", required=True, help="node name sent back as the first line")
    p.add_argument("--port", type=int, default=7, help="UDP port (default 7)")
    p.add_argument("--bind", default="0.0.0.0", help="address to bind (default: all)")
    p.add_argument("--ipv6", action="store_true", help="also serve IPv6 (on [::])")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    print(f"udpecho {args.name}: serving udp/{args.port}", file=sys.stderr, flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        serve(args.name, args.port, args.bind, args.ipv6)
    return 0


if __name__ == "__main__":
    sys.exit(main())
