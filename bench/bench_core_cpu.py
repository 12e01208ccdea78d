"""Benchmark: CPU of the membership glue + core per agent, 8 nodes at 100 ms, fake clock.

Run (no root): .venv/bin/python bench/bench_core_cpu.py [--seconds 60] [--nodes 8]
               [--profile N]

Owns: a deterministic event-driven model of ``--nodes`` agents' membership layers
(:class:`~multihost.agent_membership.MembershipGlue` over the real core, heartbeats encoded
and authenticated), driven the way :mod:`multihost.agent_heartbeats` drives them: one
``received`` per datagram (network delay 0.1-1 ms), a timer at ``next_deadline()`` firing
0-1 ms late (``received([])`` then ``tick``), ``applied`` 1 ms after each ``Confirm``; the
process CPU time those calls take, as % of one core per agent; the calls, timer re-arms and
kernel operations per agent-second; ``--profile N``: the top N functions (cProfile).

What it leaves out (the agent's own costs): the event loop, socket syscalls, log lines and
the kernel thread.  Results go to stdout only.

Must not: sleep, read the wall clock for the model (only ``process_time`` to measure), or
open sockets.
"""

from __future__ import annotations

import argparse
import cProfile
import heapq
import itertools
import pstats
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from multihost.agent_membership import Actions, Confirm, Lease, MembershipGlue, Retarget
from multihost.membership.config import MembershipConfig

KEY = b"bench-core-cpu-key-0123456789abc"


def configs(n: int) -> dict[str, MembershipConfig]:
    """The lab's defaults at 100 ms: dead_after 230 ms, jitter 5 ms, margin 10 ms."""
    names = [chr(ord("A") + i) for i in range(n)]
    members = {name: i for i, name in enumerate(names)}
    return {
        name: MembershipConfig(
            cluster="bench",
            node=name,
            members=members,
            groups={"web": frozenset(names)},
            key=KEY,
            interval=0.1,
            dead_after=0.23,
            config_digest=b"bench",
            lease_margin=0.01,
            jitter=0.005,
            strict_transitions=False,
        )
        for name in names
    }


class Model:
    def __init__(self, n: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        self.queue: list[tuple[float, int, Callable[[], None]]] = []
        self.order = itertools.count()
        self.glues = {
            name: MembershipGlue(
                c, self.rng.randbytes(8), 0.0, names=list(c.members), link_up=lambda: True
            )
            for name, c in configs(n).items()
        }
        self.timer: dict[str, tuple[float, int] | None] = dict.fromkeys(self.glues)
        self.counts: Counter[str] = Counter()
        self.cpu = 0.0

    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self.queue, (t, next(self.order), fn))

    def call(self, name: str, fn: Callable[[], Actions], what: str) -> None:
        t0 = time.process_time()
        actions = fn()
        self.cpu += time.process_time() - t0
        self.counts[what] += 1
        self.perform(name, actions)

    def perform(self, name: str, actions: Actions) -> None:
        glue = self.glues[name]
        for payload in actions.sends:
            self.counts["sends"] += 1
            for other in self.glues:
                if other != name:
                    self.deliver(other, payload, self.now + self.rng.uniform(0.0001, 0.001))
        for op in actions.kernel:
            self.counts[type(op).__name__] += 1
            if isinstance(op, Confirm):
                self.at(self.now + 0.001, self._applied(name, op.epoch))
            elif isinstance(op, Lease | Retarget):
                pass
        self.counts["logs"] += len(actions.logs)
        t0 = time.process_time()
        deadline = glue.next_deadline()
        self.cpu += time.process_time() - t0
        cur = self.timer[name]
        if cur is not None and abs(cur[0] - deadline) < 1e-4:
            return
        self.counts["timer-arms"] += 1
        token = next(self.order)
        self.timer[name] = (deadline, token)
        late = self.rng.uniform(0.0, 0.001)
        self.at(max(deadline, self.now) + late, self._timer(name, token))

    def deliver(self, name: str, payload: bytes, t: float) -> None:
        glue = self.glues[name]
        self.at(t, lambda: self.call(name, lambda: glue.received([payload], self.now), "received"))

    def _applied(self, name: str, epoch: int) -> Callable[[], None]:
        glue = self.glues[name]
        return lambda: self.call(name, lambda: glue.applied(epoch, self.now), "applied")

    def _timer(self, name: str, token: int) -> Callable[[], None]:
        glue = self.glues[name]

        def fire() -> None:
            cur = self.timer[name]
            if cur is None or cur[1] != token:
                return  # cancelled
            self.timer[name] = None

            def both() -> Actions:
                out = glue.received([], self.now)
                out.extend(glue.tick(self.now))
                return out

            self.call(name, both, "timer")

        return fire

    def run(self, until: float) -> None:
        for name, glue in self.glues.items():
            self.at(
                0.0,
                lambda name=name, glue=glue: self.call(  # type: ignore[misc]
                    name, lambda: glue.tick(self.now), "timer"
                ),
            )
        while self.queue and self.queue[0][0] <= until:
            t, _, fn = heapq.heappop(self.queue)
            self.now = t
            fn()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0, help="simulated seconds measured")
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--profile", type=int, default=0, help="print the top N functions")
    args = ap.parse_args()
    m = Model(args.nodes, args.seed)
    m.run(5.0)  # converge (start-up grace, handshakes)
    views = {tuple(sorted(g.live())) for g in m.glues.values()}
    assert len(views) == 1 and len(next(iter(views))) == args.nodes, views
    m.cpu = 0.0
    m.counts.clear()
    prof = cProfile.Profile() if args.profile else None
    if prof:
        prof.enable()
    m.run(5.0 + args.seconds)
    if prof:
        prof.disable()
    agent_s = args.seconds * args.nodes
    pct = 100 * m.cpu / agent_s
    print(
        f"{args.nodes} nodes, {args.seconds:g} s simulated: glue+core CPU {pct:.3f} % of one "
        f"core per agent ({1e6 * m.cpu / max(1, m.counts['received']):.1f} us per received)"
    )
    print("per agent-second:", {k: round(v / agent_s, 2) for k, v in sorted(m.counts.items())})
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
