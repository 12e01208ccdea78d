"""Chaos run: keep long-lived and new connections flowing through a lab while a seeded random
schedule crashes, recovers, drains, undrains and link-flaps nodes; account for every
connection.

Owns:

* the schedule (:func:`plan`): reproducible from the seed, at least ``min_serving`` nodes
  live and not drained after every event, everything failed is recovered and everything
  drained undrained before the end;
* carrying it out (:func:`execute`, through :mod:`multihost.lab.faults` and the agents'
  control sockets), with the instant of every event;
* :class:`Traffic`: :mod:`multihost.lab.chaos_worker` in a client namespace;
* :func:`analyse`: per connection, which nodes answered (from the worker's capture), who
  reset it, whether it was lost on a node that failed while it lived (expected) or
  otherwise (``lost_other``), and the most recent event before each long-lived reset;
* :func:`run`: the whole run on a lab that is up; :func:`run_lab`: build one if needed.

Must not: change the lab except through ``faults``/the agents' control requests (and
``lab.build`` when it builds its own lab; ``agent_nice`` renices the lab's own agents, by
recorded PID), or send traffic itself (the worker does).
"""

from __future__ import annotations

import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multihost.control import ControlError, request
from multihost.lab import agents, build, faults
from multihost.lab.clean import clean
from multihost.lab.failover import agent_status, wait_converged
from multihost.lab.state import LabError, LabState, load_state
from multihost.lab.topology import describe
from multihost.lab.worker import NetnsWorker

KINDS = ("crash", "recover", "drain", "undrain", "link")
SLOW_RECOVER_S = 120.0
FAILS = ("crash", "link")
Row = dict[str, Any]
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Planned:
    t: float  # seconds after the traffic started
    kind: str  # one of KINDS
    node: str


def plan(
    members: tuple[str, ...] | list[str],
    duration: float,
    seed: int,
    *,
    gap: tuple[float, float] = (1.5, 4.0),
    start: float = 2.0,
    settle: float = 6.0,
    min_serving: int = 2,
) -> list[Planned]:
    """A seeded schedule over ``duration`` s; the last ``settle`` s undo what is left."""
    rng = random.Random(seed)
    failed: dict[str, str] = {}
    drained: set[str] = set()
    out: list[Planned] = []
    t = start + rng.uniform(0, 1)
    end = max(start, duration - settle)
    weights = {"crash": 3, "link": 2, "drain": 3, "recover": 4, "undrain": 4}
    while t < end:
        serving = [m for m in members if m not in failed and m not in drained]
        spare = len(serving) > min_serving
        options: list[tuple[str, str]] = []
        for m in members:
            if m in failed:
                options.append(("recover", m))
            elif spare or m not in serving:  # failing a drained node keeps the serving count
                options += [("crash", m), ("link", m)]
                if m in drained:
                    options.append(("undrain", m))
                elif spare:
                    options.append(("drain", m))
            elif m in drained:
                options.append(("undrain", m))
        kind, node = rng.choices(options, [weights[k] for k, _ in options])[0]
        out.append(Planned(round(t, 3), kind, node))
        if kind in FAILS:
            failed[node] = kind
            if kind == "crash":
                drained.discard(node)  # a restarted agent comes back undrained
        elif kind == "recover":
            del failed[node]
        elif kind == "drain":
            drained.add(node)
        else:
            drained.discard(node)
        t += rng.uniform(*gap)
    for node in sorted(failed):
        out.append(Planned(round(t, 3), "recover", node))
        t += 1.0
    for node in sorted(drained):
        out.append(Planned(round(t, 3), "undrain", node))
        t += 1.0
    return out


def renice(state: LabState, nice: int | None, nodes: list[str] | None = None) -> None:
    """Give the lab's agents (by recorded PID) scheduling priority ``nice`` (None: leave)."""
    if nice is None:
        return
    for n in nodes or list(state.topology.members):
        rec = agents.agent_record(state, n)
        if rec is not None:
            os.setpriority(os.PRIO_PROCESS, int(rec["pid"]), nice)


def execute(state: LabState, ev: Planned) -> float:
    """Carry out one event; returns the instant (``time.time()``) it took effect."""
    if ev.kind in FAILS:
        return float(faults.fail(state, ev.node, ev.kind)["t"])
    if ev.kind == "recover":
        t = time.time()
        try:
            return float(faults.recover(state, ev.node)["t"])
        except LabError:
            if faults.failed(state)[ev.node]["how"] != "crash":
                raise
        # The restarted agent did not answer within 20 s (a starved host): wait longer for
        # that same process rather than start another one, then record the recovery.
        agents.wait_ready(state, ev.node, timeout=SLOW_RECOVER_S)
        state.agents["failed"].pop(ev.node)
        state.live = [m for m in state.topology.members if m in state.live or m == ev.node]
        state.save()
        return t
    t = time.time()
    try:
        request(agents.control_socket(state, ev.node), ev.kind, timeout=5.0)
    except ControlError as e:
        raise LabError(f"agent {ev.node}: {ev.kind} failed: {e}") from None
    return t


class Traffic(NetnsWorker):
    """The chaos worker in a client namespace (context manager); :meth:`stop` -> rows."""

    module = "multihost.lab.chaos_worker"
    what = "chaos worker"
    stderr_tail = 500

    def __init__(
        self, state: LabState, req: dict[str, Any], client: str = "c1", family: int = 4
    ) -> None:
        topo = state.topology
        host = topo.host(client)
        super().__init__(host.netns)
        self.req = {
            "target": topo.vip_of(family),
            "port": topo.port,
            "interface": host.interface,
            "addresses": list(host.sources(family)),
            "group": topo.heartbeat_group,
            "hb_local": host.address,
            "hb_port": agents.HEARTBEAT_PORT,
            **req,
        }
        self.t_ready = 0.0
        self.extra: dict[str, Any] = {}

    def __enter__(self) -> Traffic:
        self.t_ready = float(self.start({**self.req}, 20.0)["t"])
        return self

    def stop(self, timeout: float = 60.0) -> list[Row]:
        """Stop the traffic and return one row per connection (``extra``: capture etc.)."""
        self._send({"stop": True})
        rows: list[Row] = []
        for obj in self._until_done(timeout)[0]:
            event = obj.pop("event", None)
            if event is None:
                rows.append(obj)
            else:
                self.extra[event] = obj
        return rows


# --- analysis ---------------------------------------------------------------------------


def _senders(row: Row, macs: dict[str, str]) -> dict[str, list[float]]:
    return {macs.get(m, m): v for m, v in row.get("macs", {}).items()}


def analyse(
    rows: list[Row],
    events: list[dict[str, Any]],
    macs: dict[str, str],
    t0: float,
    max_examples: int = 20,
) -> dict[str, Any]:
    """Reduce the worker's rows against the events (each ``{"t", "kind", "node"}``)."""
    fails = [e for e in events if e["kind"] in FAILS]
    res: dict[str, Any] = {"attempted": len(rows), "succeeded": 0, "failed": 0}
    res.update(duplicates=0, lost_on_crashed_node=0, lost_other=0)
    reset = dict.fromkeys(KINDS, 0)
    on_failed: Counter[str] = Counter()
    other_by: Counter[str] = Counter()
    by_event_node = 0  # lost_other reset by the very node the last event was about
    streams = [r for r in rows if r["kind"] == "stream"]
    short = [r for r in rows if r["kind"] == "short"]
    examples: list[dict[str, Any]] = []
    dup_examples: list[dict[str, Any]] = []
    for r in rows:
        senders = _senders(r, macs)
        answered = sorted(n for n, v in senders.items() if v[0] > 0)
        node = r["node"] or (answered[0] if len(answered) == 1 else "")
        ok = r["outcome"] == "ok"
        established = r["requests"] > 0 if r["kind"] == "stream" else ok
        res["succeeded" if established else "failed"] += 1
        if len(answered) >= 2:
            res["duplicates"] += 1
            if len(dup_examples) < 10:
                first = {n: round((senders[n][3] - t0) * 1000) for n in answered}
                dup_examples.append({"flow": f"{r['saddr']}:{r['sport']}", "first_ms": first})
        if ok:
            continue
        rst = [(v[2], n) for n, v in senders.items() if v[1] > 0 and v[2]]
        t_loss = min(rst)[0] if rst else float(r["t_end"])
        before = [e for e in events if e["t"] <= t_loss]
        last = before[-1] if before else None
        if r["kind"] == "stream" and r["requests"] > 0 and last is not None:
            reset[last["kind"]] += 1
        hit = [e for e in fails if e["node"] == node and r["t0"] - 0.05 <= e["t"] <= t_loss]
        if node and hit:
            res["lost_on_crashed_node"] += 1
            on_failed[hit[-1]["kind"]] += 1
            continue
        res["lost_other"] += 1
        other_by[last["kind"] if last else "none"] += 1
        by_event_node += bool(last and last["node"] in {n for _, n in rst})
        if len(examples) < max_examples:
            examples.append(
                {
                    "kind": r["kind"],
                    "flow": f"{r['saddr']}:{r['sport']}",
                    "outcome": r["outcome"],
                    "error": r["error"],
                    "node": node or None,
                    "reset_by": sorted(n for _, n in rst),
                    "requests": r["requests"],
                    "t_ms": round((t_loss - t0) * 1000),
                    "opened_ms": round((float(r["t0"]) - t0) * 1000),
                    "last_event": last["event"] if last else None,
                    "last_event_ms": round((last["t"] - t0) * 1000) if last else None,
                }
            )
    connect = sorted(
        (float(r["t_conn"]) - float(r["t0"])) * 1000 for r in short if r["t_conn"] is not None
    )
    res["long_lived"] = {
        "total": len(streams),
        "reset": reset,
        "established": sum(r["requests"] > 0 for r in streams),
        "requests": sum(int(r["requests"]) for r in streams),
        "by_outcome": dict(Counter(r["outcome"] for r in streams)),
    }
    res["short"] = {
        "attempted": len(short),
        "succeeded": sum(r["outcome"] == "ok" for r in short),
        "by_outcome": dict(Counter(r["outcome"] for r in short)),
        "connect_ms": _percentiles(connect),
        "connect_over_1s": sum(c > 1000 for c in connect),
    }
    res["lost_on_failed_node"] = dict(on_failed)
    res["lost_other_by_last_event"] = dict(other_by)
    res["lost_other_reset_by_event_node"] = by_event_node
    res["lost_other_examples"] = examples
    res["duplicate_examples"] = dup_examples
    return res


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}

    def pick(q: float) -> float:
        return round(values[min(len(values) - 1, int(q * len(values)))], 1)

    return {"p50": pick(0.5), "p99": pick(0.99), "max": round(values[-1], 1)}


# --- the run ----------------------------------------------------------------------------


def _logs(state: LabState) -> dict[str, Path]:
    recs = {n: agents.agent_record(state, n) for n in state.topology.members}
    return {n: Path(r["log"]) for n, r in recs.items() if r is not None}


def _log_events(state: LabState, since: dict[str, int]) -> dict[str, dict[str, int]]:
    """Per agent, how often the interesting events were logged since ``since``."""
    names = ("member-dead", "lease-lapsed", "view-changed", "suspended", "quorum-lost", "loop-late")
    out: dict[str, dict[str, int]] = {}
    for n, path in _logs(state).items():
        with open(path, "rb") as f:
            f.seek(since.get(n, 0))
            text = f.read().decode(errors="replace")
        out[n] = {k: text.count(f"event={k} ") for k in names}
    return out


def run(
    state: LabState,
    duration: float,
    seed: int,
    *,
    streams: int = 16,
    rate: float = 20.0,
    gap: tuple[float, float] = (1.5, 4.0),
    agent_nice: int | None = None,
    max_examples: int = 20,
    progress: Progress | None = None,
    family: int = 4,
) -> dict[str, Any]:
    """One chaos run on a lab that is up with every node healthy; returns the report.

    ``agent_nice``: run the agents at this nice value (also after every restart), to tell
    what CPU starvation of the agents does from what the product does; ``family``: the
    traffic goes to the IPv4 or the IPv6 traffic IP.
    """
    say = progress or (lambda _msg: None)
    topo = state.topology
    members = list(topo.members)
    if faults.failed(state):
        raise LabError(f"nodes are failed: {','.join(faults.failed(state))}; recover them first")
    renice(state, agent_nice)
    wait_converged(state, members, timeout=30)
    schedule = plan(members, duration, seed, gap=gap)
    logs = {n: p.stat().st_size for n, p in _logs(state).items()}
    load_start = os.getloadavg()
    req = {"seed": seed, "streams": streams, "rate": rate, "timeout": 5.0, "stream_timeout": 3.0}
    events: list[dict[str, Any]] = []
    drained: set[str] = set()
    with Traffic(state, req, family=family) as traffic:
        t0 = traffic.t_ready
        say(f"traffic started: {streams} streams, {rate:g} new connections/s")
        try:
            for ev in schedule:
                time.sleep(max(0.0, t0 + ev.t - time.time()))
                called = time.monotonic()
                t = execute(state, ev)
                took = round((time.monotonic() - called) * 1000)
                if ev.kind == "recover":
                    renice(state, agent_nice, [ev.node])
                text = f"{ev.kind} {ev.node}"
                events.append(
                    {"t": t, "kind": ev.kind, "node": ev.node, "event": text, "took_ms": took}
                )
                drained = (drained | {ev.node}) if ev.kind == "drain" else drained - {ev.node}
                say(f"{t - t0:7.2f}s {text}")
            time.sleep(max(0.0, t0 + duration - time.time()))
            converge = wait_converged(state, members, timeout=30)
        finally:
            _restore(state, drained)
        rows = traffic.stop()
    res = analyse(rows, events, {n.mac: n.name for n in topo.nodes}, t0, max_examples)
    statuses = {n: agent_status(state, n) or {} for n in members}
    res.update(
        events=[
            {"t_ms": round((e["t"] - t0) * 1000), "event": e["event"], "took_ms": e["took_ms"]}
            for e in events
        ],
        host_loadavg={"start": load_start, "end": os.getloadavg()},
        seed=seed,
        duration_s=round(time.time() - t0, 1),
        nodes=members,
        prefix=state.prefix,
        streams=streams,
        rate=rate,
        agent_nice=agent_nice,
        converged_after_s=round(converge, 2),
        capture=traffic.extra.get("capture", {}),
        heartbeat_gaps=traffic.extra.get("heartbeats", {}).get("gaps", {}),
        heartbeat_long_gaps=[
            {"t_ms": round((t - t0) * 1000), "from": a, "gap_ms": g}
            for t, a, g in traffic.extra.get("heartbeats", {}).get("long", [])
        ],
        agent_log_events=_log_events(state, logs),
        view_changes={n: s.get("counters", {}).get("view_changes") for n, s in statuses.items()},
        # membership timers > 100 ms late, per agent since it (last) started; the
        # agent_log_events' loop-late counts cover agents that were crashed and restarted
        late_timers={n: s.get("counters", {}).get("late_timers") for n, s in statuses.items()},
    )
    return res


def _restore(state: LabState, drained: set[str]) -> None:
    """Best effort after an interrupted run: recover failed nodes, undrain drained ones."""
    for node in list(faults.failed(state)):
        try:
            faults.recover(state, node)
        except LabError as e:
            print(f"chaos: could not recover {node}: {e}", file=sys.stderr)
    for node in sorted(drained):
        try:
            request(agents.control_socket(state, node), "undrain", timeout=5.0)
        except ControlError as e:
            print(f"chaos: could not undrain {node}: {e}", file=sys.stderr)


def run_lab(
    prefix: str,
    nodes: int | None,
    duration: float,
    seed: int,
    *,
    keep: bool = False,
    max_drain_ms: int | None = None,
    quorum: bool = False,
    backend: str = "auto",
    ipv6: bool = False,
    **kw: Any,
) -> dict[str, Any]:
    """:func:`run` on the lab with ``prefix``; builds a ``nodes``-node lab if there is none
    (default 4, ``quorum`` as given; removed afterwards unless ``keep``; ``max_drain_ms``
    defaults to outlast the run)."""
    state = load_state(prefix)
    built = state is None
    if state is None:
        drain = max_drain_ms if max_drain_ms is not None else int((duration + 120) * 1000)
        topo = describe(nodes or 4, prefix=prefix, seed=seed, ipv6=ipv6)
        state = build.build(topo, max_drain_ms=drain, quorum=quorum, backend=backend)
    elif nodes is not None and len(state.topology.nodes) != nodes:
        raise LabError(f"lab {prefix!r} has {len(state.topology.nodes)} nodes, not {nodes}")
    try:
        family = 6 if ipv6 else 4
        if ipv6 and not state.topology.ipv6:
            raise LabError(f"lab {prefix!r} is not dual stack (build it with 'lab up --ipv6')")
        res = run(state, duration, seed, family=family, **kw)
        res["family"] = f"ipv{family}"
        res["lab_built"] = built
        res["max_drain_ms"] = state.agents.get("max_drain_ms", 60_000)
        res["quorum"] = bool(state.agents.get("quorum", False))
        res["dataplane"] = state.agents.get("dataplane", {})
        return res
    finally:
        if built and not keep:
            clean(prefix)
