"""Benchmark: the CPU floor under the agent's CPU target -- what a process costs that only
wakes up as an agent does, with none of the agent's work.

Run (root): .venv/bin/python bench/bench_cpu_floor.py [--seconds 30] [--nodes 8]

Owns: one network namespace ``mhtFfloor-<pid>`` (loopback only, removed afterwards) and
the ``--nodes`` worker processes it starts there (this file with ``--worker``; killed by
PID).  Each worker, at SCHED_RR 10 like the agents, sends a 160-byte datagram to each other
worker every 100 ms (phases spread over the interval) and reads every datagram it
receives, up to 4 per wake-up -- the agents' socket wake-ups at 100 ms heartbeats, without
decoding, HMAC, membership or kernel work.  Two loops are measured one after the other:
``asyncio`` (as the agent) and a bare ``selectors`` epoll loop.  CPU = utime + stime from
``/proc/<pid>/stat`` over ``--seconds``, as % of one core, per worker; the median is what
to hold against ``bench_agent_cpu.py``'s.

Must not: send anything outside its namespace, or touch processes it did not start.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import selectors
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

BASE_PORT = 20000
INTERVAL = 0.1
PAYLOAD = 160
DRAIN = 4


def _socket(me: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", BASE_PORT + me))
    sock.setblocking(False)
    return sock


def _drain(sock: socket.socket) -> None:
    for _ in range(DRAIN):
        try:
            sock.recv(2048)
        except BlockingIOError:
            return


def worker_asyncio(me: int, n: int) -> None:
    sock = _socket(me)
    peers = [("127.0.0.1", BASE_PORT + i) for i in range(n) if i != me]
    payload = os.urandom(PAYLOAD)

    async def main() -> None:
        asyncio.get_running_loop().add_reader(sock.fileno(), _drain, sock)
        await asyncio.sleep(me * INTERVAL / n)
        while True:
            for p in peers:
                sock.sendto(payload, p)
            await asyncio.sleep(INTERVAL)

    asyncio.run(main())


def worker_epoll(me: int, n: int) -> None:
    sock = _socket(me)
    peers = [("127.0.0.1", BASE_PORT + i) for i in range(n) if i != me]
    payload = os.urandom(PAYLOAD)
    sel = selectors.EpollSelector()
    sel.register(sock, selectors.EVENT_READ)
    due = time.monotonic() + me * INTERVAL / n
    while True:
        if sel.select(max(0.0, due - time.monotonic())):
            _drain(sock)
        if time.monotonic() >= due:
            for p in peers:
                sock.sendto(payload, p)
            due += INTERVAL


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14 and 15)


def measure(netns: str, loop: str, nodes: int, seconds: float) -> list[float]:
    cmd = ["ip", "netns", "exec", netns, sys.executable, __file__, "--worker", loop]
    procs = [subprocess.Popen([*cmd, str(i), str(nodes)]) for i in range(nodes)]
    try:
        time.sleep(3)  # started and in phase
        t0 = {p.pid: _cpu_ticks(p.pid) for p in procs}
        time.sleep(seconds)
        hz = os.sysconf("SC_CLK_TCK")
        return [round(100 * (_cpu_ticks(p.pid) - t0[p.pid]) / hz / seconds, 2) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--worker", nargs=3, metavar=("LOOP", "INDEX", "NODES"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        loop, me, n = args.worker[0], int(args.worker[1]), int(args.worker[2])
        os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(10))
        (worker_asyncio if loop == "asyncio" else worker_epoll)(me, n)
        return 0
    netns = f"mhtFfloor-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
        for loop in ("asyncio", "epoll"):
            cpu = measure(netns, loop, args.nodes, args.seconds)
            print(
                f"{loop:8} {args.nodes} workers, {args.seconds:.0f} s: CPU % of one core "
                f"median {statistics.median(cpu):.2f} (min {min(cpu):.2f}, max {max(cpu):.2f})"
                f"  {cpu}",
                flush=True,
            )
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
