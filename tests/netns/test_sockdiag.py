"""sock_diag probe against real TCP connections in a namespace of its own (``mhtS-<pid>-``).

One namespace: the traffic IP 198.18.0.100 and a client address 198.18.0.1 on ``lo``
(plus ``::1``); listeners on the traffic IP (IPv4, and a dual-stack IPv6 one whose IPv4
connections are ``::ffff:`` mapped) and on 127.0.0.1 (not a traffic IP); real connections
between them.  Every check polls the dump until it matches, with a timeout.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections import Counter
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest

from multihost.dataplane.conntrack import Row
from multihost.dataplane.nft import netns_entered
from multihost.dataplane.sockdiag import dump_sockets
from tests.netns import nsutil

PREFIX = "mhtS-"
VIP = IPv4Address("198.18.0.100")
CLIENT = IPv4Address("198.18.0.1")
LOOP6 = IPv6Address("::1")
TCP = socket.IPPROTO_TCP
Local = frozenset[IPv4Address | IPv6Address] | None


@pytest.fixture
def node() -> Iterator[str]:
    nsutil.cleanup_stale(PREFIX)
    with nsutil.netns_group("node", prefix=PREFIX) as ns:
        name = ns["node"]
        for addr in (VIP, CLIENT):
            nsutil.run("ip", "-n", name, "addr", "add", f"{addr}/32", "dev", "lo")
        yield name


def _settle(expected: list[Row], local: Local, timeout: float = 5.0) -> list[Row]:
    """Poll the dump until it holds exactly ``expected`` (as a multiset); assert on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        got = dump_sockets(local)
        if Counter(got) == Counter(expected) or time.monotonic() > deadline:
            assert sorted(got) == sorted(expected)
            return got
        time.sleep(0.005)  # polling interval


def _ss_rows(ns: str) -> list[Row]:
    """``ss -tn`` (connected sockets: no listeners, no TIME_WAIT) parsed into rows."""
    out = nsutil.run("ip", "netns", "exec", ns, "ss", "-tnH").stdout
    rows: list[Row] = []
    for line in out.splitlines():
        fields = line.split()
        if not fields:
            continue
        (here, lport), (peer, pport) = (_endpoint(f) for f in fields[3:5])
        rows.append((peer, pport, here, lport, TCP, None))
    return rows


def _endpoint(text: str) -> tuple[str, int]:
    addr, port = text.rsplit(":", 1)
    a = ip_address(addr.strip("[]").split("%")[0])
    if isinstance(a, IPv6Address) and a.ipv4_mapped:
        a = a.ipv4_mapped
    return str(a), int(port)


class Pair:
    """One established connection: the client socket and the server's accepted socket."""

    def __init__(
        self, stack: contextlib.ExitStack, listener: socket.socket, src: str, dst: str
    ) -> None:
        family = socket.AF_INET6 if ":" in src else socket.AF_INET
        self.client = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
        self.client.settimeout(5.0)
        self.client.bind((src, 0))
        self.client.connect((dst, listener.getsockname()[1]))
        self.server = stack.enter_context(listener.accept()[0])
        cs, cp = _endpoint_of(self.client.getsockname())
        ss, sp = _endpoint_of(self.server.getsockname())
        self.server_row: Row = (cs, cp, ss, sp, TCP, None)  # the node's side, client's view
        self.client_row: Row = (ss, sp, cs, cp, TCP, None)


def _endpoint_of(name: tuple[str, int] | tuple[str, int, int, int]) -> tuple[str, int]:
    return _endpoint(f"[{name[0]}]:{name[1]}")


def _listener(stack: contextlib.ExitStack, family: int, host: str, port: int) -> socket.socket:
    s = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.settimeout(5.0)
    s.bind((host, port))
    s.listen(16)
    return s


def test_dump_sockets_sees_exactly_the_held_connections(node: str) -> None:
    vips = frozenset({VIP})
    with contextlib.ExitStack() as stack, netns_entered(node):
        assert dump_sockets() == []  # listeners are not connections
        l4 = _listener(stack, socket.AF_INET, str(VIP), 8080)
        l6 = _listener(stack, socket.AF_INET6, "::", 8081)  # dual-stack: IPv4 is ::ffff:
        other = _listener(stack, socket.AF_INET, "127.0.0.1", 9000)
        assert dump_sockets() == []
        to_vip = [Pair(stack, l4, str(CLIENT), str(VIP)) for _ in range(3)]
        mapped = [Pair(stack, l6, str(CLIENT), str(VIP)) for _ in range(2)]
        v6 = Pair(stack, l6, str(LOOP6), str(LOOP6))
        local = Pair(stack, other, "127.0.0.1", "127.0.0.1")
        pairs = [*to_vip, *mapped, v6, local]
        assert mapped[0].server.family == socket.AF_INET6

        everything = [r for p in pairs for r in (p.server_row, p.client_row)]
        got = _settle(everything, None)
        assert Counter(got) == Counter(_ss_rows(node))  # ss agrees
        assert all(r[2] == str(VIP) and r[3] == 8081 for r in (p.server_row for p in mapped))
        _settle([p.server_row for p in to_vip + mapped], vips)  # the node side only
        _settle([p.client_row for p in to_vip + mapped], frozenset({CLIENT}))
        _settle([v6.server_row, v6.client_row], frozenset({LOOP6}))
        mapped_vip = frozenset({IPv6Address(f"::ffff:{VIP}")})
        _settle([p.server_row for p in to_vip + mapped], mapped_vip)

        # Client closes first: both halves are still held (the node's in CLOSE_WAIT, the
        # client's in FIN_WAIT2) until the node closes too (LAST_ACK, then gone; the
        # client's goes to TIME_WAIT, a finished connection).
        gone = to_vip.pop(0)
        gone.client.close()
        _settle([p.server_row for p in to_vip + mapped] + [gone.server_row], vips)
        _settle([p.client_row for p in to_vip + mapped] + [gone.client_row], frozenset({CLIENT}))
        gone.server.close()
        _settle([p.server_row for p in to_vip + mapped], vips)
        _settle([p.client_row for p in to_vip + mapped], frozenset({CLIENT}))

        # The node closes first on a mapped connection; a reset one goes at once.
        first = mapped.pop(0)
        first.server.close()
        first.client.close()
        reset = to_vip.pop(0)
        reset.server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        reset.server.close()
        _settle([p.server_row for p in to_vip + mapped], vips)
        remaining = [*to_vip, *mapped, v6, local]
        _settle([r for p in remaining for r in (p.server_row, p.client_row)], None)
        assert Counter(dump_sockets()) == Counter(_ss_rows(node))
