"""Measure a failover in a running lab with real packets, and wait for the lab to converge.

Owns:

* reading the agents' status (:func:`agent_status`) and deciding convergence
  (:func:`ownership_problem`, :func:`wait_converged`): every expected live agent reports
  that live set and the buckets they report as owned (owned + incoming) are exactly the
  model's assignment for it, which implies they partition the hash space;
* choosing source ports whose flows land in given nodes' buckets (:func:`plan_ports`, with
  :func:`multihost.flowhash.flow_bucket` and :mod:`multihost.assignment`);
* driving :mod:`multihost.lab.failover_worker` in the client namespace (:class:`Worker`)
  and reducing its per-attempt rows (:func:`analyse`);
* :func:`measure`: fail a node (``lab.faults``), mark the instant, watch the survivors'
  status until they own the failed node's buckets (:class:`TakeoverWatch`), and report
  both times (:class:`FailoverResult`).

Must not: change the lab except through :mod:`multihost.lab.faults` (one failure per
:func:`measure`; recovery is the caller's), send traffic itself (the worker does), or
target anything but the lab's traffic IP.
"""

from __future__ import annotations

import contextlib
import ipaddress
import random
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from multihost.assignment import assign, slots_of
from multihost.control import ControlError, request
from multihost.flowhash import Flow, HashMode, flow_bucket
from multihost.lab import agents, faults
from multihost.lab.state import LabError, LabState
from multihost.lab.topology import PROBE_PORTS, Topology
from multihost.lab.worker import NetnsWorker

PORT_RANGE = PROBE_PORTS
Row = dict[str, Any]


# --- status and convergence -------------------------------------------------------------


def agent_status(state: LabState, node: str, timeout: float = 1.0) -> dict[str, Any] | None:
    """The agent's ``status`` reply, None if it does not answer."""
    try:
        return request(agents.control_socket(state, node), "status", timeout=timeout)
    except ControlError:
        return None


def owned_mask(status: dict[str, Any], buckets: int, group: str = "web") -> npt.NDArray[np.bool_]:
    """The buckets an agent reports it takes new flows in (owned + incoming)."""
    mask = np.zeros(buckets, dtype=bool)
    for lo, hi in status["groups"][group]["owned"]["ranges"]:
        mask[int(lo) : int(hi) + 1] = True
    return mask


def expected_owners(topo: Topology, live: Sequence[str]) -> npt.NDArray[np.int8]:
    """Owner slot of every bucket for ``live`` (the model), -1 for none."""
    return assign(slots_of(list(live), topo.members), topo.table).owners


def ownership_problem(state: LabState, live: Sequence[str], *, quiet: bool = False) -> str | None:
    """Why the lab has not converged to ``live`` (None: it has).

    Converged: each agent of ``live`` answers, reports exactly ``live``, and the buckets
    they own are the model's for ``live`` (so they partition the space exactly).  With
    ``quiet``, no handover may be in progress either (nothing draining or incoming).
    """
    topo = state.topology
    want = [m for m in topo.members if m in live]
    owners = expected_owners(topo, want)
    count = np.zeros(topo.buckets, dtype=np.int16)
    for node in want:
        st = agent_status(state, node)
        if st is None:
            return f"agent {node} does not answer"
        if list(st["live"]) != want:
            return f"agent {node} sees live {','.join(st['live']) or '-'}"
        mask = owned_mask(st, topo.buckets)
        count += mask
        slot = topo.members.index(node)
        wrong = int(np.count_nonzero(mask != (owners == slot)))
        if wrong:
            return f"agent {node} owns {int(mask.sum())} buckets, {wrong} differ from the model"
        h = st["handover"]
        if quiet and (h["draining_buckets"] or h["incoming_buckets"]):
            return f"agent {node} is handing over ({h['draining_buckets']} draining)"
    if want and not np.all(count == 1):
        return f"{int(np.count_nonzero(count != 1))} buckets not owned exactly once"
    return None


def wait_converged(
    state: LabState,
    live: Sequence[str],
    *,
    timeout: float = 20.0,
    quiet: bool = False,
    poll: float = 0.02,
) -> float:
    """Poll until :func:`ownership_problem` is None; returns the seconds it took."""
    started = time.monotonic()
    while (problem := ownership_problem(state, live, quiet=quiet)) is not None:
        if time.monotonic() - started > timeout:
            raise LabError(
                f"lab did not converge to live {','.join(live)} within {timeout:.0f}s: {problem}"
            )
        time.sleep(poll)
    return time.monotonic() - started


class LogCursor:
    """The agents' log lines (``agent-<NODE>.log``) appended after a point in time."""

    def __init__(self, state: LabState) -> None:
        self.state = state
        self.offsets = {n: self._size(n) for n in state.topology.members}

    def _path(self, node: str) -> Path:
        return self.state.directory / f"agent-{node}.log"

    def _size(self, node: str) -> int:
        try:
            return self._path(node).stat().st_size
        except OSError:
            return 0

    def lines(self, node: str) -> list[str]:
        try:
            with open(self._path(node), "rb") as f:
                f.seek(self.offsets.get(node, 0))
                return f.read().decode(errors="replace").splitlines()
        except OSError:
            return []

    def events(self, event: str, nodes: Iterable[str] | None = None) -> list[str]:
        """New lines of ``event`` (e.g. ``view-changed``) of ``nodes`` (default: all)."""
        want = f" event={event} "
        return [
            line
            for n in (self.state.topology.members if nodes is None else nodes)
            for line in self.lines(n)
            if want in line + " "
        ]


# --- flows ------------------------------------------------------------------------------


def target_of(topo: Topology, saddr: str) -> str:
    """The traffic IP a client source address talks to: the one of its family."""
    return topo.vip_of(ipaddress.ip_address(saddr).version)


def port_bucket(topo: Topology, saddr: str, sport: int) -> int:
    """The bucket of the TCP flow ``saddr:sport`` -> traffic IP, as the kernel hashes it."""
    daddr = ipaddress.ip_address(target_of(topo, saddr))
    flow = Flow(ipaddress.ip_address(saddr), sport, daddr, topo.port, "tcp")
    return flow_bucket(flow, topo.buckets, topo.seed, HashMode(topo.hash_mode))


def plan_ports(
    topo: Topology,
    live: Sequence[str],
    owners: Iterable[str],
    count: int,
    *,
    saddr: str,
    seed: int,
    exclude: Iterable[int] = (),
) -> list[int]:
    """``count`` distinct source ports whose TCP flow from ``saddr`` to the traffic IP
    lands in a bucket owned (for ``live``) by one of ``owners``; in random order."""
    table = expected_owners(topo, [m for m in topo.members if m in live])
    slots = {topo.members.index(o) for o in owners}
    skip = set(exclude)
    candidates = list(range(*PORT_RANGE))
    random.Random(seed).shuffle(candidates)
    out: list[int] = []
    for port in candidates:
        if port in skip:
            continue
        if int(table[port_bucket(topo, saddr, port)]) in slots:
            out.append(port)
            if len(out) == count:
                return out
    raise LabError(f"only {len(out)} source ports land in {sorted(slots)}'s buckets")


# --- the worker -------------------------------------------------------------------------


class Worker(NetnsWorker):
    """:mod:`multihost.lab.failover_worker` in a client namespace (a context manager)."""

    module = "multihost.lab.failover_worker"
    what = "failover worker"

    def __init__(self, netns: str, req: dict[str, Any], ready_timeout: float = 15.0) -> None:
        super().__init__(netns)
        self.req = req
        self.ready_timeout = ready_timeout

    def __enter__(self) -> Worker:
        self.start(self.req, self.ready_timeout)
        return self

    def mark(self, t_fail: float) -> None:
        """Tell the worker the failure instant."""
        self._send({"t_fail": t_fail})

    def results(self, timeout: float) -> tuple[list[Row], str]:
        """Every attempt's row and why the worker stopped."""
        rows, done = self._until_done(timeout)
        return rows, str(done.get("reason", ""))


def worker_request(
    topo: Topology,
    *,
    saddr: str,
    ports: list[int],
    control: list[int],
    failed: Iterable[str],
    expect: Iterable[str] = (),
    spacing: float = 0.005,
    timeout: float = 0.25,
    max_seconds: float = 10.0,
    linger: float = 0.3,
    control_every: int = 4,
) -> dict[str, Any]:
    return {
        "target": target_of(topo, saddr),
        "port": topo.port,
        "saddr": saddr,
        "ports": ports,
        "control": control,
        "control_every": control_every,
        "spacing": spacing,
        "timeout": timeout,
        "failed": sorted(failed),
        "expect": sorted(expect),
        "linger": linger,
        "max_seconds": max_seconds,
    }


def analyse(rows: list[Row], t_fail: float, failed: set[str]) -> dict[str, Any]:
    """Reduce worker rows: first connection after ``t_fail`` answered by another node, etc."""
    after = [r for r in rows if float(r["t0"]) >= t_fail]
    target = [r for r in after if r["kind"] == "target"]
    ok = [r for r in target if r["outcome"] == "answered" and r["node"] and r["node"] not in failed]

    def t_ok(r: Row) -> float:
        return float(r["t_conn"] or r["t1"])

    first = min(ok, key=t_ok) if ok else None
    first_by: dict[str, float] = {}
    for r in ok:
        first_by[r["node"]] = min(first_by.get(r["node"], float("inf")), t_ok(r))
    t_first = t_ok(first) if first is not None else None
    control = [r for r in after if r["kind"] == "control"]
    before = [r for r in rows if float(r["t0"]) < t_fail and r["kind"] == "target"]

    def ms(t: float | None) -> float | None:
        return None if t is None else round((t - t_fail) * 1000, 1)

    return {
        "first_ms": ms(t_first),
        "first_by_node_ms": {n: ms(t) for n, t in sorted(first_by.items())},
        "attempts_before": len(before),
        "answered_before": sum(r["outcome"] == "answered" for r in before),
        # Before the failure only the failed node(s) should answer: anything else means
        # the lab was not in its steady state when the failure came (a trial to discard).
        "steady_before": bool(before)
        and all(r["outcome"] == "answered" and r["node"] in failed for r in before),
        "attempts": len(target),
        "answered_by_failed": sum(
            r["outcome"] == "answered" and r["node"] in failed for r in target
        ),
        "unanswered_before_first": sum(
            r["outcome"] != "answered" for r in target if t_first is None or r["t0"] < t_first
        ),
        "unanswered_after_first": sum(
            r["outcome"] != "answered" for r in target if t_first is not None and r["t0"] > t_first
        ),
        "control_attempts": len(control),
        "control_unanswered": sum(r["outcome"] != "answered" for r in control),
        "control_unanswered_ms": [
            ms(float(r["t0"])) for r in control if r["outcome"] != "answered"
        ][:20],
    }


# --- one measured failover --------------------------------------------------------------


@dataclass
class FailoverResult:
    """One failure of ``node`` (``how``) and how the lab took its buckets over."""

    node: str
    how: str
    t_fail: float
    survivors: list[str]
    first_ms: float | None  # first new connection to its buckets answered by a survivor
    all_served_ms: float | None  # survivors' status: they own every bucket (their new shares)
    status_ms: dict[str, float | None] = field(default_factory=dict)  # per survivor
    flows: dict[str, Any] = field(default_factory=dict)  # :func:`analyse` of the attempts
    worker_stop: str = ""
    rows: list[Row] = field(default_factory=list, repr=False)  # every attempt (not in to_dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["rows"]
        return out


class TakeoverWatch(threading.Thread):
    """Poll the survivors (in a thread, from before the failure) until each reports live =
    ``survivors`` and owns exactly its model share for it; ``done[node]`` is the
    ``time.time()`` of the first such reply."""

    def __init__(
        self, state: LabState, survivors: Sequence[str], *, limit: float, poll: float = 0.01
    ) -> None:
        super().__init__(name="takeover-watch", daemon=True)
        self.state = state
        self.survivors = list(survivors)
        self.limit = limit
        self.poll = poll
        self.done: dict[str, float | None] = dict.fromkeys(survivors)
        self.stop = threading.Event()

    def run(self) -> None:
        topo = self.state.topology
        owners = expected_owners(topo, self.survivors)
        want = [m for m in topo.members if m in self.survivors]
        until = time.monotonic() + self.limit
        while not self.stop.is_set() and time.monotonic() < until:
            for node in [n for n, v in self.done.items() if v is None]:
                st = agent_status(self.state, node, timeout=0.5)
                if st is None or list(st["live"]) != want:
                    continue
                mine = owners == topo.members.index(node)
                if np.array_equal(owned_mask(st, topo.buckets), mine):
                    self.done[node] = time.time()
            if all(v is not None for v in self.done.values()):
                return
            self.stop.wait(self.poll)

    def result(self, t_fail: float, timeout: float) -> dict[str, float | None]:
        """Per survivor, ms after ``t_fail`` (None: not within ``timeout`` from now)."""
        self.join(timeout)
        self.stop.set()
        self.join()
        return {
            n: None if t is None else round((t - t_fail) * 1000, 1) for n, t in self.done.items()
        }


@contextlib.contextmanager
def _stopping(watch: TakeoverWatch) -> Iterator[None]:
    try:
        yield
    finally:
        watch.stop.set()


def measure(
    state: LabState,
    node: str,
    how: str = "crash",
    *,
    spacing: float = 0.005,
    timeout: float = 0.25,
    max_seconds: float = 10.0,
    seed: int | None = None,
    client: str = "c1",
    control_every: int = 4,
    linger: float = 0.3,
    family: int = 4,
) -> FailoverResult:
    """Fail ``node`` while the worker opens connections to its buckets (and, one per
    ``control_every``, to the survivors' as a control); the lab is left with ``node``
    failed.  ``linger``: how long the worker goes on after every survivor answered one;
    ``family``: over the IPv4 or the IPv6 traffic IP."""
    topo = state.topology
    live = list(state.live)
    if node not in live:
        raise LabError(f"node {node} is not live ({','.join(live)})")
    survivors = [m for m in live if m != node]
    host = topo.host(client)
    rng = random.Random(seed)
    n = int((max_seconds + linger) / spacing) + 50
    if not host.sources(family):
        raise LabError(f"client {client} has no IPv{family} address (use 'lab up --ipv6')")
    saddr = host.sources(family)[0]
    ports = plan_ports(topo, live, [node], n, saddr=saddr, seed=rng.randrange(1 << 30))
    control = plan_ports(
        topo,
        live,
        survivors,
        n // control_every + 1,
        saddr=saddr,
        seed=rng.randrange(1 << 30),
    )
    req = worker_request(
        topo,
        saddr=saddr,
        ports=ports,
        control=control,
        failed=[node],
        expect=survivors,
        spacing=spacing,
        timeout=timeout,
        max_seconds=max_seconds,
        linger=linger,
        control_every=control_every,
    )
    watch = TakeoverWatch(state, survivors, limit=max_seconds + 5)
    with Worker(host.netns, req) as w, _stopping(watch):
        time.sleep(0.05)  # attempts answered by the old owner show the worker works
        watch.start()
        w.mark(time.time())  # (for the worker's stop rule; fail() takes the exact instant)
        called = time.monotonic()
        # A crash returns once the process is reaped: its exit can wait >1 s for RCU
        # grace periods (packet socket release) after the kernel dropped its nft table.
        entry = faults.fail(state, node, how)
        call_ms = round((time.monotonic() - called) * 1000, 1)
        t_fail = float(entry["t"])
        rows, reason = w.results(timeout=max_seconds + 10)
        status = watch.result(t_fail, timeout=max(0.0, t_fail + max_seconds - time.time()))
    flows = analyse(rows, t_fail, {node})
    flows["fail_call_ms"] = call_ms
    known = [v for v in status.values() if v is not None]
    all_ms = max(known) if len(known) == len(status) else None
    return FailoverResult(
        node, how, t_fail, survivors, flows["first_ms"], all_ms, status, flows, reason, rows
    )
