"""Probe worker: runs inside a client namespace and probes one flow per source port/id.

Started by :mod:`multihost.lab.probe` as ``ip netns exec <client> python -m
multihost.lab.probe_worker``; reads one JSON request on stdin::

    {"proto": "tcp"|"udp"|"icmp", "target": "198.18.0.100", "port": 80,
     "flows": [["198.18.0.201", 40000], ...],   # (source address, source port | ICMP id)
     "concurrency": 200, "timeout": 3.0, "dup_wait": 0.1,
     "rate": 0,                                 # TCP/UDP: flows started per second, 0 = no limit
     "interface": "eth0", "macs": {"02:6d:68:0a:00:01": "A", ...}}

and prints one JSON line per flow, in completion order::

    {"i": 0, "saddr": "...", "sport": 40000, "outcome": "answered", "node": "A",
     "dups": [], "error": ""}

(behind a transparent lab's proxies, TCP rows also have ``"backend": "b1"`` and
``"seen": "ADDR:PORT"``, the client as the back end saw it).

``outcome`` is ``answered``, ``reset`` (ECONNRESET/ECONNREFUSED, ICMP port unreachable),
``timeout`` or ``failed`` (anything else; ``error`` says what).  TCP: one HTTP/1.0 GET per
connection from an explicitly bound source port; the node is the ``X-Multihost-Node``
header if there is one, else the body's first line.  UDP:
one datagram per source port; the node is the reply's first line, later replies within
``dup_wait`` are listed in ``dups``.  ICMP (ICMPv6 for an IPv6 target): one echo request per
(source address, id) from a raw socket; the node is found from the reply's source MAC
(``macs``), read from a packet socket on ``interface``.

Must not: send to anything but ``target``, or run outside a lab client namespace.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import select
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

Result = dict[str, Any]
Emit = Callable[[Result], None]
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
PACKET_OUTGOING = 4


def _result(i: int, flow: list[Any], outcome: str, node: str = "", error: str = "") -> Result:
    return {
        "i": i,
        "saddr": flow[0],
        "sport": flow[1],
        "outcome": outcome,
        "node": node,
        "dups": [],
        "error": error,
    }


def _classify(i: int, flow: list[Any], e: BaseException) -> Result:
    if isinstance(e, TimeoutError):
        return _result(i, flow, "timeout")
    if isinstance(e, ConnectionResetError | ConnectionRefusedError):
        return _result(i, flow, "reset", error=type(e).__name__)
    if isinstance(e, OSError) and e.errno is not None:
        return _result(i, flow, "failed", error=errno.errorcode.get(e.errno, str(e.errno)))
    return _result(i, flow, "failed", error=f"{type(e).__name__}: {e}")


def bound_socket(kind: int, saddr: str, sport: int) -> socket.socket:
    """A non-blocking socket bound to ``(saddr, sport)`` (IPv4 or IPv6, by ``saddr``; closed
    again if that fails); shared by the lab's client-side workers."""
    sock = socket.socket(socket.AF_INET6 if ":" in saddr else socket.AF_INET, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setblocking(False)
        sock.bind((saddr, sport))
    except OSError:
        sock.close()
        raise
    return sock


def emit(obj: dict[str, Any]) -> None:
    """One JSON line to the parent (flushed at once)."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


#: The header a transparent lab's proxies add (``multihost.lab.backbuild.NODE_HEADER``).
NODE_HEADER = b"x-multihost-node"


def parse_http(data: bytes) -> tuple[str, str]:
    """``(node, error)`` from a raw HTTP response on status 200: the ``X-Multihost-Node``
    header (a transparent lab's proxy), else the body's first line (a node's own nginx)."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return "", "no HTTP header end" if data else "empty response"
    lines = head.split(b"\r\n")
    status = lines[0].split()
    if len(status) < 2 or status[1] != b"200":
        return "", f"HTTP status {b' '.join(status[1:]).decode(errors='replace')!r}"
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == NODE_HEADER and value.strip():
            return value.strip().decode(errors="replace"), ""
    node = body.split(b"\n", 1)[0].strip().decode(errors="replace")
    return (node, "") if node else ("", "empty body")


def parse_backend(data: bytes) -> dict[str, str]:
    """A back end's answer behind a transparent proxy: ``{"backend": its name, "seen":
    "ADDR:PORT"}`` (the client as the back end saw it), or ``{}`` if there is none."""
    head, _, body = data.partition(b"\r\n\r\n")
    if NODE_HEADER not in head.lower():
        return {}
    first, _, rest = body.partition(b"\n")
    fields = dict(kv.split("=", 1) for kv in rest.decode(errors="replace").split() if "=" in kv)
    return {"backend": first.strip().decode(errors="replace"), "seen": fields.get("client", "")}


async def tcp_one(i: int, flow: list[Any], req: dict[str, Any]) -> Result:
    loop = asyncio.get_running_loop()
    try:
        sock = bound_socket(socket.SOCK_STREAM, flow[0], int(flow[1]))
    except OSError as e:
        return _classify(i, flow, e)
    try:
        async with asyncio.timeout(float(req["timeout"])):
            await loop.sock_connect(sock, (req["target"], int(req["port"])))
            target = f"[{req['target']}]" if ":" in req["target"] else req["target"]
            host = f"{target}:{req['port']}".encode()
            await loop.sock_sendall(sock, b"GET / HTTP/1.0\r\nHost: " + host + b"\r\n\r\n")
            data = b""
            while chunk := await loop.sock_recv(sock, 4096):
                data += chunk
    except (TimeoutError, OSError) as e:
        return _classify(i, flow, e)
    finally:
        sock.close()
    node, error = parse_http(data)
    if not node:
        return _result(i, flow, "failed", error=error)
    return {**_result(i, flow, "answered", node), **parse_backend(data)}


async def udp_one(i: int, flow: list[Any], req: dict[str, Any]) -> Result:
    loop = asyncio.get_running_loop()
    payload = f"multihost-probe {flow[0]}:{flow[1]}".encode()
    try:
        sock = bound_socket(socket.SOCK_DGRAM, flow[0], int(flow[1]))
    except OSError as e:
        return _classify(i, flow, e)
    try:
        sock.connect((req["target"], int(req["port"])))
        await loop.sock_sendall(sock, payload)
        async with asyncio.timeout(float(req["timeout"])):
            first = await loop.sock_recv(sock, 65535)
        replies = [first]
        try:
            async with asyncio.timeout(float(req.get("dup_wait", 0.1))):
                while True:
                    replies.append(await loop.sock_recv(sock, 65535))
        except (TimeoutError, OSError):
            pass
    except (TimeoutError, OSError) as e:
        return _classify(i, flow, e)
    finally:
        sock.close()
    nodes = []
    for reply in replies:
        name, sep, echoed = reply.partition(b"\n")
        if not sep or echoed != payload:
            return _result(i, flow, "failed", error=f"bad echo {reply[:40]!r}")
        nodes.append(name.decode(errors="replace"))
    res = _result(i, flow, "answered", nodes[0])
    res["dups"] = nodes[1:]
    return res


async def run_async(req: dict[str, Any], emit: Emit) -> None:
    one = tcp_one if req["proto"] == "tcp" else udp_one
    sem = asyncio.Semaphore(max(1, int(req["concurrency"])))
    rate = float(req.get("rate") or 0)
    t0 = time.monotonic()

    async def guarded(i: int, flow: list[Any]) -> None:
        async with sem:
            if rate > 0:  # flow i starts no earlier than i/rate seconds in
                await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
            emit(await one(i, flow, req))

    await asyncio.gather(*(guarded(i, f) for i, f in enumerate(req["flows"])))


def icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def echo_request(ident: int, seq: int, payload: bytes, *, v6: bool = False) -> bytes:
    """An ICMP echo request; ``v6``: ICMPv6 (type 128, checksum 0: a raw ICMPv6 socket has
    the kernel fill it in over the pseudo-header, RFC 3542 section 3.1)."""
    if v6:
        return struct.pack("!BBHHH", 128, 0, 0, ident, seq) + payload
    header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    csum = icmp_checksum(header + payload)
    return struct.pack("!BBHHH", 8, 0, csum, ident, seq) + payload


def parse_echo_reply(frame: bytes) -> tuple[str, str, str, int] | None:
    """``(source MAC, IP source, IP destination, id)`` of an Ethernet ICMP or ICMPv6 echo
    reply (IPv6: the echo must directly follow the fixed header, as the nodes send it)."""
    if len(frame) < 14 + 20 + 8:
        return None
    mac = ":".join(f"{b:02x}" for b in frame[6:12])
    ip = frame[14:]
    if frame[12:14] == b"\x08\x00":
        ihl = (ip[0] & 0x0F) * 4
        if ip[9] != 1 or len(ip) < ihl + 8 or ip[ihl] != 0:
            return None
        ident = struct.unpack_from("!H", ip, ihl + 4)[0]
        return mac, socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20]), ident
    if frame[12:14] == b"\x86\xdd":
        if len(ip) < 40 + 8 or ip[6] != socket.IPPROTO_ICMPV6 or ip[40] != 129:
            return None
        ident = struct.unpack_from("!H", ip, 44)[0]
        src = socket.inet_ntop(socket.AF_INET6, ip[8:24])
        dst = socket.inet_ntop(socket.AF_INET6, ip[24:40])
        return mac, src, dst, ident
    return None


def _canonical(address: str) -> str:
    """The address as the parser writes it (IPv6 compressed, as ``inet_ntop``)."""
    return str(ipaddress.ip_address(address))


def run_icmp(req: dict[str, Any], emit: Emit) -> None:
    flows: list[list[Any]] = req["flows"]
    target, timeout = str(req["target"]), float(req["timeout"])
    dup_wait, limit = float(req.get("dup_wait", 0.1)), max(1, int(req["concurrency"]))
    macs: dict[str, str] = req.get("macs", {})
    v6 = ":" in target
    ethertype = ETH_P_IPV6 if v6 else ETH_P_IP
    rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ethertype))
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    rx.bind((req.get("interface", "eth0"), ethertype))
    rx.setblocking(False)
    senders: dict[str, socket.socket] = {}
    index = {(_canonical(str(f[0])), int(f[1])): i for i, f in enumerate(flows)}
    canonical_target = _canonical(target)
    pending: dict[int, float] = {}  # flow index -> deadline
    answered: dict[int, tuple[Result, float]] = {}  # collecting duplicates until deadline
    nxt = 0
    try:
        while nxt < len(flows) or pending or answered:
            now = time.monotonic()
            while nxt < len(flows) and len(pending) + len(answered) < limit:
                saddr, ident = str(flows[nxt][0]), int(flows[nxt][1])
                if saddr not in senders:
                    tx = (
                        socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
                        if v6
                        else socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
                    )
                    tx.bind((saddr, 0))
                    tx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                    senders[saddr] = tx
                try:
                    request = echo_request(ident, 1, b"multihost-probe", v6=v6)
                    senders[saddr].sendto(request, (target, 0))
                    pending[nxt] = now + timeout
                except OSError as e:
                    emit(_classify(nxt, flows[nxt], e))
                nxt += 1
            deadlines = [d for d in pending.values()] + [d for _, d in answered.values()]
            wait = max(0.0, min(deadlines, default=now) - now)
            select.select([rx], [], [], min(wait, 0.05))
            while True:
                try:
                    frame, addr = rx.recvfrom(2048)
                except BlockingIOError:
                    break
                if addr[2] == PACKET_OUTGOING:
                    continue
                parsed = parse_echo_reply(frame)
                if parsed is None or parsed[1] != canonical_target:
                    continue
                i = index.get((parsed[2], parsed[3]))
                node = macs.get(parsed[0], parsed[0])
                if i is not None and i in pending:
                    del pending[i]
                    answered[i] = (
                        _result(i, flows[i], "answered", node),
                        time.monotonic() + dup_wait,
                    )
                elif i is not None and i in answered:
                    answered[i][0]["dups"].append(node)
            now = time.monotonic()
            for i in [i for i, d in pending.items() if d <= now]:
                del pending[i]
                emit(_result(i, flows[i], "timeout"))
            for i in [i for i, (_, d) in answered.items() if d <= now]:
                emit(answered.pop(i)[0])
    finally:
        rx.close()
        for tx in senders.values():
            tx.close()


def main() -> int:
    req: dict[str, Any] = json.loads(sys.stdin.read())
    out = sys.stdout
    count = 0

    def emit(res: Result) -> None:
        nonlocal count
        out.write(json.dumps(res) + "\n")
        count += 1
        if count % 50 == 0:
            out.flush()

    if req["proto"] == "icmp":
        run_icmp(req, emit)
    else:
        asyncio.run(run_async(req, emit))
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
