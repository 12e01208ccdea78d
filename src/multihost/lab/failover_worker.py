"""Failover worker: runs inside a lab client namespace and opens a new TCP connection every
few milliseconds, each from its own source port, timestamping what answered.

Started by :mod:`multihost.lab.failover` as ``ip netns exec <client> python -m
multihost.lab.failover_worker``.  Protocol on stdin/stdout (one JSON object per line)::

    -> {"target": "198.18.0.100", "port": 80, "saddr": "198.18.0.201",
        "ports": [40001, ...],      # target flows (e.g. in the failed node's buckets)
        "control": [40007, ...],    # control flows (e.g. in the survivors' buckets)
        "control_every": 4,         # one control attempt per this many target attempts
        "spacing": 0.005, "timeout": 0.25, "failed": ["D"],
        "expect": ["A", "B", "C"],  # optional: nodes that must each answer first
        "linger": 0.3, "max_seconds": 10.0, "wait_mark": 30.0}
    <- {"event": "ready", "t": 1790000000.1}
    -> {"t_fail": 1790000000.2}      # the failure instant (time.time(), shared by namespaces)
    <- {"kind": "target", "sport": 40001, "t0": ..., "t_conn": ..., "t1": ...,
        "outcome": "answered", "node": "A", "error": ""}     # one line per attempt, then
    <- {"event": "done", "reason": "linger" | "max_seconds" | "ports" | "no-mark" | "stop"}

Attempts start at once (so answers before the failure show the old owner) and go on until
``linger`` seconds after the first target connection answered by a node not in ``failed``
and started at or after ``t_fail`` (with ``expect``: after each node in it has answered one
such connection; survivors detect a failure independently, so they take over at different
instants), or ``max_seconds`` after ``t_fail``, or the target
ports run out.  ``{"stop": true}`` on stdin ends it early.  Every attempt has its own
timeout; a dropped SYN is never retransmitted within it, so each attempt samples the data
plane at its start.  Timestamps are ``time.time()``; ``t_conn`` is when the handshake
completed (null if it did not), ``t1`` when the attempt ended.

Must not: send to anything but ``target``, reuse a source port, or run outside a lab
client namespace.
"""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import sys
import time
from typing import Any

from multihost.lab.probe_worker import bound_socket, emit, parse_http

Row = dict[str, Any]


class Worker:
    def __init__(self, req: dict[str, Any]) -> None:
        self.req = req
        self.target = (str(req["target"]), int(req["port"]))
        self.saddr = str(req["saddr"])
        self.ports: list[int] = [int(p) for p in req["ports"]]
        self.control: list[int] = [int(p) for p in req.get("control", [])]
        self.control_every = max(1, int(req.get("control_every", 4)))
        self.spacing = float(req.get("spacing", 0.005))
        self.timeout = float(req.get("timeout", 0.25))
        self.failed = {str(n) for n in req.get("failed", [])}
        self.linger = float(req.get("linger", 0.3))
        self.expect = {str(n) for n in req.get("expect", [])}
        self.first_by: dict[str, float] = {}
        self.max_seconds = float(req.get("max_seconds", 10.0))
        self.wait_mark = float(req.get("wait_mark", 30.0))
        self.t_fail: float | None = None
        self.first_ok: float | None = None
        self.stop_reason = ""
        self.rows: list[Row] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def attempt(self, kind: str, sport: int) -> None:
        loop = asyncio.get_running_loop()
        row: Row = {"kind": kind, "sport": sport, "t0": time.time(), "t_conn": None}
        row.update(t1=None, outcome="failed", node="", error="")
        sock: socket.socket | None = None
        try:
            sock = bound_socket(socket.SOCK_STREAM, self.saddr, sport)
            async with asyncio.timeout(self.timeout):
                await loop.sock_connect(sock, self.target)
                row["t_conn"] = time.time()
                host = f"{self.target[0]}:{self.target[1]}".encode()
                await loop.sock_sendall(sock, b"GET / HTTP/1.0\r\nHost: " + host + b"\r\n\r\n")
                data = b""
                while chunk := await loop.sock_recv(sock, 4096):
                    data += chunk
            node, error = parse_http(data)
            row.update(outcome="answered" if node else "failed", node=node, error=error)
        except TimeoutError:
            row["outcome"] = "timeout"
        except (ConnectionResetError, ConnectionRefusedError) as e:
            row.update(outcome="reset", error=type(e).__name__)
        except OSError as e:
            row["error"] = errno.errorcode.get(e.errno or 0, str(e))
        finally:
            if sock is not None:
                sock.close()
        row["t1"] = time.time()
        self.rows.append(row)
        ok_node = row["outcome"] == "answered" and row["node"] not in self.failed
        if kind == "target" and ok_node and self.t_fail is not None and row["t0"] >= self.t_fail:
            t = row["t_conn"] or row["t1"]
            node = str(row["node"])
            self.first_by[node] = min(self.first_by.get(node, t), t)
            if not self.expect:  # the first answer from anyone
                self.first_ok = min(self.first_by.values())
            elif self.expect <= self.first_by.keys():  # the last of the expected nodes' firsts
                self.first_ok = max(self.first_by[n] for n in self.expect)

    def launch(self, kind: str, sport: int) -> None:
        task = asyncio.get_running_loop().create_task(self.attempt(kind, sport))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def on_stdin(self) -> None:
        line = sys.stdin.readline()
        if not line:
            self.stop_reason = self.stop_reason or "stop"
            return
        msg = json.loads(line)
        if msg.get("stop"):
            self.stop_reason = "stop"
        elif "t_fail" in msg:
            self.t_fail = float(msg["t_fail"])

    def should_stop(self, now: float, started: float) -> bool:
        if self.stop_reason:
            return True
        if self.t_fail is None:
            if now - started > self.wait_mark:
                self.stop_reason = "no-mark"
            return bool(self.stop_reason)
        if self.first_ok is not None and now >= self.first_ok + self.linger:
            self.stop_reason = "linger"
        elif now >= self.t_fail + self.max_seconds:
            self.stop_reason = "max_seconds"
        return bool(self.stop_reason)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(sys.stdin.fileno(), self.on_stdin)
        emit({"event": "ready", "t": time.time()})
        started = time.time()
        next_at = loop.time()
        n = 0
        try:
            while not self.should_stop(time.time(), started):
                if n >= len(self.ports):
                    self.stop_reason = "ports"
                    break
                self.launch("target", self.ports[n])
                if n % self.control_every == 0 and n // self.control_every < len(self.control):
                    self.launch("control", self.control[n // self.control_every])
                n += 1
                next_at = max(next_at + self.spacing, loop.time())
                await asyncio.sleep(max(0.0, next_at - loop.time()))
            if self.tasks:
                await asyncio.wait(set(self.tasks), timeout=self.timeout + 1.0)
        finally:
            loop.remove_reader(sys.stdin.fileno())


def main() -> int:
    req: dict[str, Any] = json.loads(sys.stdin.readline())
    w = Worker(req)
    asyncio.run(w.run())
    for row in sorted(w.rows, key=lambda r: float(r["t0"])):
        sys.stdout.write(json.dumps(row) + "\n")
    emit({"event": "done", "reason": w.stop_reason})
    return 0


if __name__ == "__main__":
    sys.exit(main())
