"""Helpers for root tests: network namespaces, veth pairs, commands and sockets inside them.

Owns: naming (every namespace is ``mhtA-<pid>-<n>-<role>``, so concurrent runs and other
helpers' namespaces never collide), creation and guaranteed deletion of namespaces (deleting a
namespace also deletes its interfaces and nftables tables), polling with a timeout instead of
sleeping, and traffic rounds (UDP, TCP handshakes, ICMP echo) that report which flows got
through.  A round ends when a filter counter (``Counter``: accepted and dropped packets) has
seen every packet and every accepted one has arrived: no fixed waits.

Must not: touch the root namespace's interfaces, addresses or nftables ruleset, or any
namespace it did not create.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import json
import os
import select
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from multihost.dataplane.nft import netns_entered

PREFIX = "mhtA-"
T = TypeVar("T")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
FlowT = tuple[IPAddress, int, int]  # source address, source port, destination port
Counter = Callable[[], tuple[int, int]]  # (accepted, dropped) packets of the filter
IP_MTU_DISCOVER, IP_PMTUDISC_DONT, SO_RCVBUFFORCE = 10, 0, 33
_counter = itertools.count()


def run(
    *args: str, check: bool = True, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command (no shell); raise with its stderr when ``check`` and it fails."""
    proc = subprocess.run(
        list(args), input=stdin, capture_output=True, text=True, timeout=60, check=False
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def ns_run(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command inside namespace ``ns``."""
    assert ns.startswith(PREFIX), ns
    return run("ip", "netns", "exec", ns, *args, check=check)


def namespaces() -> list[str]:
    out = run("ip", "netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale(prefix: str = PREFIX) -> None:
    """Delete ``<prefix><pid>-...`` namespaces (default ``mhtA-``) left behind by test runs
    that no longer exist."""
    for name in namespaces():
        parts = name.split("-")
        stale = name.startswith(prefix) and len(parts) >= 3 and parts[1].isdigit()
        if stale and not _pid_alive(int(parts[1])):
            run("ip", "netns", "delete", name, check=False)


@contextmanager
def netns_group(*roles: str, prefix: str = PREFIX) -> Iterator[dict[str, str]]:
    """Create one namespace per role (lo up), named ``<prefix><pid>-<n>-<role>``; always
    delete them all on exit."""
    n = next(_counter)
    names = {r: f"{prefix}{os.getpid()}-{n}-{r}" for r in roles}
    created: list[str] = []
    try:
        for name in names.values():
            run("ip", "netns", "add", name)
            created.append(name)
            run("ip", "-n", name, "link", "set", "lo", "up")
        yield names
    finally:
        for name in created:
            run("ip", "netns", "delete", name, check=False)


def veth(ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
    """A veth pair created directly inside the two namespaces, both ends up."""
    assert ns_a.startswith(PREFIX) and ns_b.startswith(PREFIX)
    run("ip", "-n", ns_a, "link", "add", if_a, "type", "veth", "peer", "name", if_b, "netns", ns_b)
    run("ip", "-n", ns_a, "link", "set", if_a, "up")
    run("ip", "-n", ns_b, "link", "set", if_b, "up")


def ip_batch(ns: str, commands: list[str]) -> None:
    """Several ``ip`` commands in one process (``ip -n NS -batch -``)."""
    assert ns.startswith(PREFIX), ns
    run("ip", "-n", ns, "-batch", "-", stdin="\n".join(commands) + "\n")


def sysctl(ns: str, key: str, value: str) -> None:
    ns_run(ns, "sysctl", "-qw", f"{key}={value}")


def sysctl_get(ns: str, key: str) -> str:
    return ns_run(ns, "sysctl", "-n", key).stdout.strip()


def addresses(ns: str, dev: str) -> set[str]:
    """``addr/prefixlen`` of every address on ``dev``."""
    out = json.loads(ns_run(ns, "ip", "-j", "addr", "show", "dev", dev).stdout)
    return {f"{a['local']}/{a['prefixlen']}" for a in out[0]["addr_info"]}


def client_node(
    client: str, node: str, client_addr: str, node_addr: str, pool: list[ipaddress.IPv4Address]
) -> None:
    """veth c0 (client) <-> n0 (node), IPv6 without DAD delay, a /32 source ``pool`` on the
    client that the node routes back via the client's address."""
    for n in (client, node):
        sysctl(n, "net.ipv6.conf.default.accept_dad", "0")
    veth(client, "c0", node, "n0")
    ip_batch(client, [f"addr add {client_addr} dev c0"] + [f"addr add {a}/32 dev c0" for a in pool])
    gateway = client_addr.split("/", maxsplit=1)[0]
    pool_net = ipaddress.ip_network(f"{pool[0]}/24", strict=False)
    ip_batch(node, [f"addr add {node_addr} dev n0", f"route add {pool_net} via {gateway}"])


def link_local(ns: str, ifname: str) -> tuple[ipaddress.IPv6Address, int]:
    """The usable (non-tentative) link-local address of ``ifname`` and its ifindex."""

    def find() -> tuple[ipaddress.IPv6Address, int] | None:
        out = ns_run(ns, "ip", "-j", "-6", "addr", "show", "dev", ifname, "scope", "link").stdout
        for link in json.loads(out):
            for a in link.get("addr_info", []):
                if "tentative" not in a:
                    return ipaddress.IPv6Address(a["local"]), int(link["ifindex"])
        return None

    found = wait_until(find, what=f"link-local address on {ifname}")
    assert isinstance(found, tuple)
    return found


def socket_in(
    ns: str, family: int = socket.AF_INET, kind: int = socket.SOCK_DGRAM, proto: int = 0
) -> socket.socket:
    """A socket that lives in ``ns`` (sockets keep the namespace they were created in)."""
    with netns_entered(ns):
        return socket.socket(family, kind, proto)


def wait_until(
    predicate: Callable[[], T | bool | None],
    timeout: float = 5.0,
    interval: float = 0.002,
    what: str = "condition",
) -> T | bool:
    """Poll ``predicate`` until it returns something truthy; raise TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def udp_round(
    client: str,
    node: str,
    count: Counter,
    vip: IPAddress,
    flows: list[FlowT],
    *,
    size: int = 32,
    scope: int = 0,
) -> set[FlowT]:
    """One datagram per flow from ``client`` to ``vip``; the flows that reached a socket."""
    family = socket.AF_INET if vip.version == 4 else socket.AF_INET6
    receivers: dict[int, socket.socket] = {}
    for port in sorted({f[2] for f in flows}):
        r = socket_in(node, family)
        r.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
        r.bind(("::" if vip.version == 6 else str(vip), port))
        r.setblocking(False)
        receivers[port] = r
    acc0, drop0 = count()
    try:
        with netns_entered(client):
            for src, sport, dport in flows:
                with socket.socket(family, socket.SOCK_DGRAM) as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if family == socket.AF_INET:
                        s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
                        s.bind((str(src), sport))
                        s.sendto(bytes(size), (str(vip), dport))
                    else:
                        s.bind((str(src), sport, 0, scope))
                        s.sendto(bytes(size), (str(vip), dport, 0, scope))
        wait_until(lambda: sum(count()) - acc0 - drop0 >= len(flows), what="packets at the filter")
        accepted = count()[0] - acc0
        got: set[FlowT] = set()

        def drain() -> bool:
            for port, r in receivers.items():
                while True:
                    try:
                        data, peer = r.recvfrom(65536)
                    except BlockingIOError:
                        break
                    assert len(data) == size
                    got.add((ipaddress.ip_address(peer[0].split("%")[0]), peer[1], port))
            return len(got) >= accepted

        wait_until(drain, what=f"{accepted} accepted datagrams in the sockets")
        return got
    finally:
        for r in receivers.values():
            r.close()


def tcp_round(
    client: str, node: str, count: Counter, vip: IPAddress, flows: list[FlowT], *, owned: set[FlowT]
) -> set[FlowT]:
    """Connect all flows at once; the flows whose handshake completed once ``owned`` did and
    every other SYN was dropped."""
    listener = socket_in(node, socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((str(vip), flows[0][2]))
    listener.listen(4096)
    drop0 = count()[1]
    socks: dict[int, tuple[socket.socket, FlowT]] = {}
    try:
        with netns_entered(client):
            for f in flows:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks[s.fileno()] = (s, f)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.setblocking(False)
                s.bind((str(f[0]), f[1]))
                err = s.connect_ex((str(vip), f[2]))
                assert err in (0, errno.EINPROGRESS), os.strerror(err)
        done: set[FlowT] = set()
        poller = select.poll()
        for fd in socks:
            poller.register(fd, select.POLLOUT)

        def progress() -> bool:
            for fd, _ in poller.poll(0):
                s, f = socks[fd]
                poller.unregister(fd)
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    done.add(f)
            return done >= owned and count()[1] - drop0 >= len(flows) - len(owned)

        wait_until(progress, what="owned handshakes and dropped SYNs")
        return done
    finally:
        for s, _ in socks.values():
            s.close()
        listener.close()


def _icmp_checksum(data: bytes) -> int:
    s = int(sum(struct.unpack(f"!{len(data) // 2}H", data)))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def icmp_send(
    client: str, src: ipaddress.IPv4Address, dst: IPAddress, kind_code: tuple[int, int], rest: bytes
) -> None:
    """Send one ICMP message (``rest``: everything after the checksum) from ``client``."""
    kind, code = kind_code
    with netns_entered(client), socket.socket(socket.AF_INET, socket.SOCK_RAW, 1) as s:
        s.bind((str(src), 0))
        data = struct.pack("!BBH", kind, code, 0) + rest
        csum = _icmp_checksum(data + bytes(len(data) % 2))
        s.sendto(struct.pack("!BBH", kind, code, csum) + rest, (str(dst), 0))


def echo_round(
    client: str, count: Counter, vip: IPAddress, sources: list[ipaddress.IPv4Address]
) -> set[IPAddress]:
    """One ICMP echo request to ``vip`` per source address; the sources that got a reply."""
    ident = 0x4D48
    rx = socket_in(client, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    rx.setblocking(False)
    acc0, drop0 = count()
    replies: set[IPAddress] = set()
    try:
        for seq, src in enumerate(sources):
            icmp_send(client, src, vip, (8, 0), struct.pack("!HH", ident, seq) + b"multihost")
        wait_until(lambda: sum(count()) - acc0 - drop0 >= len(sources), what="echo requests")
        accepted = count()[0] - acc0

        def drain() -> bool:
            while True:
                try:
                    data = rx.recv(2048)
                except BlockingIOError:
                    break
                ihl = (data[0] & 0x0F) * 4
                kind, _, _, rid, seq = struct.unpack_from("!BBHHH", data, ihl)
                if kind == 0 and rid == ident:
                    replies.add(sources[seq])
            return len(replies) >= accepted

        wait_until(drain, what="echo replies")
        return replies
    finally:
        rx.close()
