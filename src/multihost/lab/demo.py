"""The worked example with real packets: a 4-node lab through start, fail D, fail C,
recover D, with measured shares against theory and measured failover times.

Owns: :func:`run_demo` — build its own lab (its own prefix), and at each step wait for
convergence (:func:`multihost.lab.failover.wait_converged`), probe it with
:func:`multihost.lab.probe.run_probe`, compare the answers per node with the exact shares
of :mod:`multihost.assignment` (z-score per node and a chi-square test), and for a fail
step measure the failover (:func:`multihost.lab.failover.measure`); the lab is removed
at the end, also on an error or ^C.  The ``steps`` object is ``lab demo --json``.

Must not: touch a lab it did not build (it refuses to start if the prefix is in use),
print (the CLI renders; progress goes through a callback), or edit anything under
``membership/`` or the agent.
"""

from __future__ import annotations

import math
import os
import random
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from types import FrameType
from typing import Any

from multihost.assignment import assign, slots_of
from multihost.lab import build, failover, faults
from multihost.lab.clean import clean
from multihost.lab.probe import run_probe
from multihost.lab.state import LabError, LabState
from multihost.lab.topology import describe
from multihost.tablechoice import table_for

DEFAULT_PREFIX = "mhdemo-"
EVENTS = ("fail D", "fail C", "recover D")
MIN_CONNECTIONS = 100
Progress = Callable[[str], None]


@dataclass
class DemoConfig:
    connections: int = 2000
    how: str = "crash"
    prefix: str = DEFAULT_PREFIX
    events: Sequence[str] = EVENTS
    nodes: int = 4
    seed: int | None = None
    converge_timeout: float = 30.0
    backend: str = "auto"  # cluster.dataplane of the lab's agents
    ipv6: bool = False  # a dual-stack lab, heartbeats and every probe over IPv6

    @property
    def family(self) -> int:
        return 6 if self.ipv6 else 4


def shares(members: Sequence[str], live: Sequence[str]) -> dict[str, Fraction]:
    """Exact share of the hash space of every live member."""
    a = assign(slots_of(list(live), list(members)), table_for(len(members)))
    return {members[s]: a.share(s) for s in sorted(a.live)}


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for a chi-square variable with ``df`` degrees of freedom (closed form:
    Q(x; k + 2) = Q(x; k) + (x/2)^(k/2) e^(-x/2) / Gamma(k/2 + 1))."""
    if df < 1 or x <= 0:
        return 1.0
    half = x / 2
    if df % 2 == 0:
        q, k, term = math.exp(-half), 2, half * math.exp(-half)
    else:
        q, k, term = math.erfc(math.sqrt(half)), 1, math.sqrt(2 * x / math.pi) * math.exp(-half)
    while k < df:
        q += term
        k += 2
        term *= half / (k / 2)
    return min(1.0, max(0.0, q))


def compare(observed: dict[str, int], expected: dict[str, Fraction], n: int) -> dict[str, Any]:
    """z-score per node (binomial) and the chi-square test of ``observed`` against shares."""
    z: dict[str, float] = {}
    chi2 = 0.0
    for node, p in expected.items():
        mean = n * float(p)
        sd = math.sqrt(n * float(p) * (1 - float(p))) or 1.0
        obs = observed.get(node, 0)
        z[node] = round((obs - mean) / sd, 2)
        chi2 += (obs - mean) ** 2 / mean if mean else 0.0
    df = max(0, len(expected) - 1)
    return {"z": z, "chi2": round(chi2, 2), "df": df, "p_value": round(chi2_sf(chi2, df), 4)}


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    owner = os.getpid()

    def handler(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != owner:  # a forked helper (pyroute2 netns): die as by default
            os._exit(128 + signum)
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _parse(event: str, members: Sequence[str]) -> tuple[str, str]:
    verb, _, node = event.partition(" ")
    if verb not in ("fail", "recover") or node not in members:
        raise LabError(f"event {event!r} is not 'fail NODE' or 'recover NODE' ({members})")
    return verb, node


def run_demo(cfg: DemoConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Build the lab, run every step, remove the lab; returns ``{"steps": [...], ...}``."""
    say = progress or (lambda _msg: None)
    if cfg.connections < MIN_CONNECTIONS:
        raise LabError(f"connections: at least {MIN_CONNECTIONS}")
    if cfg.how not in faults.HOWS:
        raise LabError(f"--how must be one of {', '.join(faults.HOWS)}")
    topo = describe(cfg.nodes, 1, cfg.prefix, ipv6=cfg.ipv6)
    for ev in cfg.events:
        _parse(ev, topo.members)
    rng = random.Random(cfg.seed)
    with _sigterm_as_interrupt():
        say(f"building a {cfg.nodes}-node lab (prefix {cfg.prefix}, seed {topo.seed_text})")
        started = time.monotonic()
        state = build.build(topo, lambda step: say(f"  {step}"), backend=cfg.backend)
        try:
            steps = [_step(state, "start", cfg, rng, say)]
            for ev in cfg.events:
                steps.append(_step(state, ev, cfg, rng, say))
            return {
                "steps": steps,
                "prefix": cfg.prefix,
                "seed": topo.seed_text,
                "how": cfg.how,
                "backend": cfg.backend,
                "family": f"ipv{cfg.family}",
                "target": topo.vip_of(cfg.family),
                "dataplane": state.agents.get("dataplane", {}),
                "seconds": round(time.monotonic() - started, 1),
            }
        finally:
            say(f"removing the lab {cfg.prefix}")
            clean(cfg.prefix)


def _step(
    state: LabState, event: str, cfg: DemoConfig, rng: random.Random, say: Progress
) -> dict[str, Any]:
    topo = state.topology
    members = topo.members
    fo: failover.FailoverResult | None = None
    t0 = time.monotonic()
    if event != "start":
        verb, node = _parse(event, members)
        if verb == "fail":
            say(f"{event}: {cfg.how}, opening a connection to its buckets every 5 ms")
            fo = failover.measure(
                state, node, cfg.how, seed=rng.randrange(1 << 30), family=cfg.family
            )
            say(
                f"{event}: first new connection to its buckets answered after "
                f"{fo.first_ms} ms; survivors own all buckets after {fo.all_served_ms} ms"
            )
            t0 = time.monotonic()
        else:
            say(f"{event}: restarting it")
            faults.recover(state, node)
    live = list(state.live)
    say(f"{event}: waiting until every live agent ({','.join(live)}) agrees")
    converge = failover.wait_converged(state, live, timeout=cfg.converge_timeout)
    converge_ms = round((time.monotonic() - t0) * 1000, 1)
    say(f"{event}: probing with {cfg.connections} TCP connections")
    port_seed = rng.randrange(1 << 30)
    logs = failover.LogCursor(state)
    r = run_probe(state, "tcp", cfg.connections, port_seed=port_seed, family=cfg.family)
    # A view change while probing a converged lab is a false failover: evidence for errors.
    unexpected = logs.events("view-changed", live) + logs.events("lease-lapsed", live)
    expected = shares(members, live)
    stats = compare(r.answered, expected, r.connections)
    step: dict[str, Any] = {
        "event": event,
        "live": live,
        "expected": {n: str(p) for n, p in expected.items()},
        "observed": {n: r.answered.get(n, 0) for n in members if n in live or n in r.answered},
        "connections": r.connections,
        "failed": r.failed + r.timeout,
        "duplicates": r.duplicated + r.reset,
        "failover_ms": None if fo is None else fo.first_ms,
        "all_served_ms": None if fo is None else fo.all_served_ms,
        "converge_ms": converge_ms if event != "start" else round(converge * 1000, 1),
        "mispredicted": r.mispredicted,
        "predicted": r.predicted,
        "errors": r.errors,
        **stats,
        "port_seed": port_seed,
        "events_during_probe": unexpected[:10],
    }
    if fo is not None:
        step["failover"] = fo.to_dict()
    return step
