"""Chaos worker: runs inside a lab client namespace and keeps traffic flowing while the
controller (:mod:`multihost.lab.chaos`) breaks the cluster; records what every connection saw.

Started as ``ip netns exec <client> python -m multihost.lab.chaos_worker``.  Protocol on
stdin/stdout (one JSON object per line)::

    -> {"target": "198.18.0.100", "port": 80, "interface": "eth0",
        "addresses": ["198.18.0.201", ...], "seed": 1,
        "streams": 16, "interval": 0.05, "stream_timeout": 3.0,
        "rate": 20.0, "timeout": 5.0,
        "group": "239.192.0.1", "hb_port": 7946}
    <- {"event": "ready", "t": ...}
    -> {"stop": true}                  # stop opening, close streams, wait for the rest
    <- {"kind": "stream"|"short", "saddr", "sport", "t0", "t_conn", "t_end", "outcome",
        "error", "node", "nodes", "requests", "t_last", "macs": {MAC: [n, n_rst, t_rst, t_first]}}
    <- {"event": "capture", "packets": n, "drops": n}
    <- {"event": "heartbeats", "gaps": {ADDR: {"n", "max_ms", "over_300ms"}}, "long": [...]}
    <- {"event": "done"}

Traffic: ``streams`` long-lived HTTP/1.1 keep-alive connections, each sending a request
every ``interval`` for as long as it lives (one that ends — reset, EOF, no answer within
``stream_timeout`` — is recorded and replaced by a new one on a new source port); and new
short connections (one HTTP/1.0 GET each) at ``rate`` per second.  Every connection has
its own (source address, port), never reused within a run.  ``outcome``: ``ok`` (a stream
closed by us at the end, or a short connection answered), ``reset``, ``eof``, ``timeout``
or ``failed``.

Evidence: a packet socket on ``interface`` records, per flow, which source MACs (nodes)
sent packets from the target — non-RST and RST separately, with the first RST's time — so
the controller can tell a flow answered by two nodes and who reset a connection; a UDP
socket joined to the cluster group records heartbeat inter-arrival gaps per sender.

Must not: send to anything but ``target`` (the heartbeat socket only listens), reuse a
flow, or run outside a lab client namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import random
import socket
import struct
import sys
import threading
import time
from typing import Any

from multihost.lab.probe_worker import bound_socket, emit, parse_http

Row = dict[str, Any]
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
PACKET_OUTGOING = 4
SOL_PACKET = 263
PACKET_STATISTICS = 6
TCP_RST = 0x04
PORTS = (10000, 61000)


class Capture(threading.Thread):
    """Per flow (client address, client port): source MAC -> [packets (not RST), RSTs, time
    of the first RST, time of the first other packet]."""

    def __init__(self, interface: str, target: str, port: int) -> None:
        super().__init__(name="capture", daemon=True)
        self.family = socket.AF_INET6 if ":" in target else socket.AF_INET
        ethertype = ETH_P_IPV6 if self.family == socket.AF_INET6 else ETH_P_IP
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ethertype))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
        self.sock.bind((interface, ethertype))
        self.sock.settimeout(0.2)
        self.target = socket.inet_pton(self.family, target)
        self.port = port
        self.flows: dict[tuple[bytes, int], dict[bytes, list[float]]] = {}
        self.packets = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                frame, addr = self.sock.recvfrom(256)
            except TimeoutError:
                continue
            except OSError:
                return
            if addr[2] == PACKET_OUTGOING:
                continue
            if self.family == socket.AF_INET6:  # no extension headers in the lab's traffic
                if len(frame) < 54 + 14 or frame[20] != 6 or frame[22:38] != self.target:
                    continue
                l4, client = 54, frame[38:54]
            else:
                if len(frame) < 54 or frame[23] != 6 or frame[26:30] != self.target:
                    continue
                l4, client = 14 + (frame[14] & 0x0F) * 4, frame[30:34]
            sport, dport = struct.unpack_from(">HH", frame, l4)
            if sport != self.port or len(frame) < l4 + 14:
                continue
            rst = bool(frame[l4 + 13] & TCP_RST)
            key = (client, dport)
            with self.lock:
                self.packets += 1
                per = self.flows.setdefault(key, {})
                rec = per.setdefault(frame[6:12], [0, 0, 0.0, 0.0])
                if rst:
                    rec[1] += 1
                    if not rec[2]:
                        rec[2] = time.time()
                else:
                    rec[0] += 1
                    if not rec[3]:
                        rec[3] = time.time()

    def macs(self, saddr: str, sport: int) -> dict[str, list[float]]:
        with self.lock:
            per = self.flows.get((socket.inet_pton(self.family, saddr), sport), {})
            return {":".join(f"{b:02x}" for b in m): list(v) for m, v in per.items()}

    def drops(self) -> int:
        with contextlib.suppress(OSError):
            raw = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
            return int(struct.unpack("II", raw)[1])
        return -1

    def stop(self) -> None:
        self.stopping.set()
        self.join(2.0)
        self.sock.close()


class Heartbeats:
    """Inter-arrival gaps of the cluster's heartbeats, per sender address (listen only)."""

    def __init__(self, group: str, port: int, local: str, interface: str) -> None:
        if ":" in group:
            ifindex = socket.if_nametoindex(interface)
            self.sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((group, port, 0, ifindex))
            mreq = struct.pack("16sI", socket.inet_pton(socket.AF_INET6, group), ifindex)
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((group, port))
            mreq = struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton(local))
            self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        self.sock.setblocking(False)
        self.last: dict[str, float] = {}
        self.stats: dict[str, list[float]] = {}  # addr -> [n, max gap, gaps > 300 ms]
        self.long: list[list[Any]] = []

    def on_readable(self) -> None:
        for _ in range(64):
            try:
                _, sender = self.sock.recvfrom(2048)
                addr = str(sender[0])
            except (BlockingIOError, InterruptedError):
                return
            now = time.time()
            prev = self.last.get(addr)
            self.last[addr] = now
            if prev is None:
                continue
            gap = now - prev
            s = self.stats.setdefault(addr, [0, 0.0, 0])
            s[0] += 1
            s[1] = max(s[1], gap)
            if gap > 0.3:
                s[2] += 1
                if len(self.long) < 500:
                    self.long.append([round(prev, 3), addr, round(gap * 1000)])

    def report(self) -> Row:
        gaps = {
            a: {"n": int(s[0]), "max_ms": round(s[1] * 1000), "over_300ms": int(s[2])}
            for a, s in sorted(self.stats.items())
        }
        return {"event": "heartbeats", "gaps": gaps, "long": self.long}


class Flows:
    """Distinct (source address, port) pairs in a seeded order, never one twice."""

    def __init__(self, addresses: list[str], seed: int) -> None:
        self.rng = random.Random(seed)
        self.addresses = addresses
        self.used: set[tuple[str, int]] = set()

    def next(self) -> tuple[str, int]:
        for _ in range(1000):
            flow = (self.rng.choice(self.addresses), self.rng.randrange(*PORTS))
            if flow not in self.used:
                self.used.add(flow)
                return flow
        raise RuntimeError("out of source ports")


def _outcome(row: Row, e: BaseException) -> None:
    if isinstance(e, TimeoutError):
        row["outcome"] = "timeout"
    elif isinstance(e, ConnectionResetError | ConnectionRefusedError | BrokenPipeError):
        row.update(outcome="reset", error=type(e).__name__)
    elif isinstance(e, EOFError):
        row["outcome"] = "eof"
    elif isinstance(e, OSError) and e.errno is not None:
        row.update(outcome="failed", error=errno.errorcode.get(e.errno, str(e.errno)))
    else:
        row.update(outcome="failed", error=f"{type(e).__name__}: {e}")


async def _response(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> str:
    """Read one HTTP/1.1 response (Content-Length framed); returns the node it names."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = await loop.sock_recv(sock, 4096)
        if not chunk:
            raise EOFError
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = await loop.sock_recv(sock, 4096)
        if not chunk:
            raise EOFError
        body += chunk
    return body.split(b"\n", 1)[0].decode(errors="replace").strip()


class Worker:
    def __init__(self, req: dict[str, Any]) -> None:
        self.target = (str(req["target"]), int(req["port"]))
        self.flows = Flows([str(a) for a in req["addresses"]], int(req.get("seed", 0)))
        self.streams = int(req.get("streams", 16))
        self.interval = float(req.get("interval", 0.05))
        self.stream_timeout = float(req.get("stream_timeout", 3.0))
        self.rate = float(req.get("rate", 20.0))
        self.timeout = float(req.get("timeout", 5.0))
        self.capture = Capture(str(req["interface"]), self.target[0], self.target[1])
        self.hb: Heartbeats | None = None
        if req.get("group"):
            self.hb = Heartbeats(
                str(req["group"]),
                int(req["hb_port"]),
                str(req.get("hb_local", self.flows.addresses[0])),
                str(req["interface"]),
            )
        self.rows: list[Row] = []
        self.drops = -1
        self.stopping = asyncio.Event()
        self.host = f"Host: {self.target[0]}\r\n".encode()

    def _row(self, kind: str, flow: tuple[str, int]) -> Row:
        return {
            "kind": kind,
            "saddr": flow[0],
            "sport": flow[1],
            "t0": time.time(),
            "t_conn": None,
            "t_end": None,
            "outcome": "failed",
            "error": "",
            "node": "",
            "nodes": [],
            "requests": 0,
            "t_last": None,
        }

    async def stream(self) -> None:
        """One long-lived connection after another until told to stop."""
        loop = asyncio.get_running_loop()
        request = b"GET / HTTP/1.1\r\n" + self.host + b"\r\n"
        while not self.stopping.is_set():
            flow = self.flows.next()
            row = self._row("stream", flow)
            nodes: set[str] = set()
            try:
                sock = bound_socket(socket.SOCK_STREAM, *flow)
            except OSError as e:
                _outcome(row, e)
                self._done(row)
                continue
            try:
                async with asyncio.timeout(self.timeout):
                    await loop.sock_connect(sock, self.target)
                row["t_conn"] = time.time()
                while not self.stopping.is_set():
                    async with asyncio.timeout(self.stream_timeout):
                        await loop.sock_sendall(sock, request)
                        node = await _response(loop, sock)
                    nodes.add(node)
                    row["node"] = row["node"] or node
                    row["requests"] += 1
                    row["t_last"] = time.time()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stopping.wait(), self.interval)
                row["outcome"] = "ok"
            except Exception as e:
                _outcome(row, e)
            finally:
                sock.close()
            row["nodes"] = sorted(nodes)
            self._done(row)
            if not self.stopping.is_set():
                await asyncio.sleep(0.1)  # then a new stream on a new port

    async def short(self, flow: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        row = self._row("short", flow)
        try:
            sock = bound_socket(socket.SOCK_STREAM, *flow)
        except OSError as e:
            _outcome(row, e)
            self._done(row)
            return
        try:
            async with asyncio.timeout(self.timeout):
                await loop.sock_connect(sock, self.target)
                row["t_conn"] = time.time()
                await loop.sock_sendall(sock, b"GET / HTTP/1.0\r\n" + self.host + b"\r\n")
                data = b""
                while chunk := await loop.sock_recv(sock, 4096):
                    data += chunk
            node, error = parse_http(data)
            row.update(outcome="ok" if node else "failed", node=node, error=error)
            row["nodes"] = [node] if node else []
            row["requests"] = 1
        except Exception as e:
            _outcome(row, e)
        finally:
            sock.close()
        self._done(row)

    def _done(self, row: Row) -> None:
        row["t_end"] = time.time()
        self.rows.append(row)

    def on_stdin(self) -> None:
        line = sys.stdin.readline()
        if not line or json.loads(line).get("stop"):
            self.stopping.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.capture.start()
        if self.hb is not None:
            loop.add_reader(self.hb.sock.fileno(), self.hb.on_readable)
        loop.add_reader(sys.stdin.fileno(), self.on_stdin)
        emit({"event": "ready", "t": time.time()})
        streams = [loop.create_task(self.stream()) for _ in range(self.streams)]
        shorts: set[asyncio.Task[None]] = set()
        next_at = loop.time()
        try:
            while self.rate > 0 and not self.stopping.is_set():
                task = loop.create_task(self.short(self.flows.next()))
                shorts.add(task)
                task.add_done_callback(shorts.discard)
                next_at = max(next_at + 1.0 / self.rate, loop.time())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), next_at - loop.time())
            await self.stopping.wait()
            if streams or shorts:
                await asyncio.wait([*streams, *shorts], timeout=self.timeout + 2)
            await asyncio.sleep(0.3)  # late RSTs reach the capture
        finally:
            loop.remove_reader(sys.stdin.fileno())
            if self.hb is not None:
                loop.remove_reader(self.hb.sock.fileno())
            self.drops = self.capture.drops()
            self.capture.stop()

    def report(self) -> None:
        for row in sorted(self.rows, key=lambda r: float(r["t0"])):
            row["macs"] = self.capture.macs(row["saddr"], row["sport"])
            sys.stdout.write(json.dumps(row) + "\n")
        emit({"event": "capture", "packets": self.capture.packets, "drops": self.drops})
        if self.hb is not None:
            emit(self.hb.report())
        emit({"event": "done"})


def main() -> int:
    req: dict[str, Any] = json.loads(sys.stdin.readline())
    w = Worker(req)
    asyncio.run(w.run())
    w.report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
