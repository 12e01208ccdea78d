"""Probe a running lab from a client and compare who answered with the model's prediction.

Owns: choosing the flows (distinct, explicitly bound source ports drawn from a recorded
``port_seed``; ICMP: distinct ids over the client's source addresses), predicting the node
of each flow (the traffic IP: :func:`multihost.flowhash.flow_bucket` with the lab's seed,
then the owner for the live set in the state file; a node's own address: that node),
running :mod:`multihost.lab.probe_worker` inside the client namespace, and tallying its
per-flow results into a :class:`ProbeResult` (the ``lab probe --json`` object), with each
live node's exact share of the traffic IP's hash space and the binomial 99.9 % band of its
count (:func:`binomial_band`).

Must not: send traffic itself (the worker does, inside the lab), target anything but the
traffic IP or a node's address, or change the lab.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import multihost
from multihost.assignment import assign, slots_of
from multihost.flowhash import Flow, HashMode, flow_bucket
from multihost.lab import backprobe
from multihost.lab.naming import TopologyError
from multihost.lab.state import LabError, LabState
from multihost.lab.topology import PROBE_PORTS, Host, Topology

PROTOCOLS = ("tcp", "udp", "icmp")
PORT_RANGE = PROBE_PORTS
MAX_CONNECTIONS = PORT_RANGE[1] - PORT_RANGE[0]
MAX_CONCURRENCY = 1000
Progress = Callable[[int, int], None]


@dataclass
class ProbeResult:
    proto: str
    target: str
    connections: int
    answered: dict[str, int] = field(default_factory=dict)
    failed: int = 0
    reset: int = 0
    timeout: int = 0
    mispredicted: int = 0
    duplicated: int = 0
    predicted: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)
    live: list[str] = field(default_factory=list)
    port_seed: int = 0
    seconds: float = 0.0
    #: Flows not answered (failed, reset, timeout), by the node predicted for them.
    unanswered_by_expected: dict[str, int] = field(default_factory=dict)
    #: A transparent lab: what the back ends saw (:func:`backprobe.measure`).
    transparency: dict[str, Any] | None = None
    #: ``flows=True``: one object per connection.
    flows: list[dict[str, Any]] | None = None
    #: per live node: its exact share of the traffic IP's buckets (the table's)
    shares: dict[str, Fraction] = field(default_factory=dict)
    #: per flow (in plan order): the node that answered (None: no answer)
    by_flow: list[str | None] = field(default_factory=list)
    #: independent hash keys among the flows: ICMP hashes the addresses only, so its flows
    #: come in blocks of one per source address (0: every flow is its own key)
    hash_keys: int = 0

    @property
    def keys(self) -> int:
        """The independent hash keys among the flows (``hash_keys``, else one per flow)."""
        return self.hash_keys or self.connections

    @property
    def band(self) -> dict[str, tuple[int, int]]:
        """Per live node: the central 99.9 % of Binomial(keys, share), in flows: a node
        holding ``k`` of the keys answers between ``k`` times the fewest and ``k`` times the
        most flows one key carries (one flow per key for TCP and UDP)."""
        keys = self.keys
        fewest, most = self.connections // keys, -(-self.connections // keys)
        return {
            m: (lo * fewest, hi * most)
            for m, (lo, hi) in ((m, binomial_band(keys, float(p))) for m, p in self.shares.items())
        }

    @property
    def outside_band(self) -> list[str]:
        """Live nodes whose answered count lies outside its band."""
        return [m for m, (lo, hi) in self.band.items() if not lo <= self.answered.get(m, 0) <= hi]

    @property
    def rate(self) -> float:
        return self.connections / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        bad = self.failed + self.reset + self.timeout + self.mispredicted + self.duplicated
        if self.transparency is not None and not backprobe.clean(self.transparency):
            return False
        return bad == 0

    def to_dict(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.transparency is not None:
            extra["transparency"] = self.transparency
        if self.flows is not None:
            extra["flows"] = self.flows
        return {
            "connections": self.connections,
            "answered": dict(sorted(self.answered.items())),
            "failed": self.failed,
            "reset": self.reset,
            "timeout": self.timeout,
            "mispredicted": self.mispredicted,
            "duplicated": self.duplicated,
            "proto": self.proto,
            "target": self.target,
            "predicted": dict(sorted(self.predicted.items())),
            "live": self.live,
            "shares": {m: _fraction(f) for m, f in self.shares.items()},
            "band": {m: list(b) for m, b in self.band.items()},
            "outside_band": self.outside_band,
            "hash_keys": self.keys,
            "errors": self.errors,
            "examples": self.examples,
            "port_seed": self.port_seed,
            "seconds": round(self.seconds, 3),
            "per_second": round(self.rate, 1),
            "unanswered_by_expected": dict(sorted(self.unanswered_by_expected.items())),
            **extra,
        }


def _fraction(f: Fraction) -> str:
    return str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"


def binomial_band(n: int, p: float, level: float = 0.999) -> tuple[int, int]:
    """The smallest ``lo`` and largest ``hi`` with P(X < lo) <= (1 - level)/2 and
    P(X > hi) <= (1 - level)/2 for X ~ Binomial(n, p) (exact, summed in log space)."""
    if p <= 0.0:
        return 0, 0
    if p >= 1.0:
        return n, n
    tail = (1.0 - level) / 2
    lp, lq = math.log(p), math.log1p(-p)
    pmf = [
        math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * lp
                 + (n - k) * lq)
        for k in range(n + 1)
    ]  # fmt: skip
    lo, below = 0, 0.0
    while below + pmf[lo] <= tail:
        below += pmf[lo]
        lo += 1
    hi, above = n, 0.0
    while above + pmf[hi] <= tail:
        above += pmf[hi]
        hi -= 1
    return lo, hi


def plan_flows(
    client: Host,
    proto: str,
    count: int,
    port_seed: int,
    sources: int | None = None,
    *,
    family: int = 4,
) -> list[tuple[str, int]]:
    """``count`` distinct (source address, source port | ICMP id) pairs, reproducibly.

    Addresses rotate over the client's first ``sources`` addresses of ``family`` (default:
    1 for TCP and UDP, all for ICMP, whose hash ignores ids).
    """
    if not 1 <= count <= MAX_CONNECTIONS:
        raise LabError(f"connections: {count} is outside 1..{MAX_CONNECTIONS}")
    addrs = client.sources(family)
    n = (len(addrs) if proto == "icmp" else 1) if sources is None else sources
    if not 1 <= n <= len(addrs):
        raise LabError(f"sources: {n} is outside 1..{len(addrs)} for client {client.name}")
    rng = random.Random(port_seed)
    if proto == "icmp":
        base = rng.randrange(1, 0x10000)
        ids = [(base + i) % 0xFFFF + 1 for i in range(count)]
        return [(addrs[i % n], ids[i]) for i in range(count)]
    ports = rng.sample(range(*PORT_RANGE), count)
    return [(addrs[i % n], p) for i, p in enumerate(ports)]


def _icmp_of(family: int) -> str:
    """The flow-hash protocol name of an echo probe: ICMP, or ICMPv6 to an IPv6 target."""
    return "icmpv6" if family == 6 else "icmp"


def expected_nodes(
    topo: Topology,
    *,
    live: list[str],
    target: str,
    proto: str,
    port: int,
    flows: list[tuple[str, int]],
) -> list[str | None]:
    """The node that should answer each flow (None: no live owner)."""
    node = topo.node_by_address(target)
    if node is not None:
        return [node.name] * len(flows)
    if target not in topo.vips:
        raise LabError(f"target {target} is neither a traffic IP nor a node's address")
    table = topo.table
    if table.buckets != topo.buckets:
        raise LabError(f"lab has {topo.buckets} buckets, the model {table.buckets}")
    owners = assign(slots_of(live, topo.members), table)
    mode = HashMode(topo.hash_mode)
    daddr = ipaddress.ip_address(target)
    out: list[str | None] = []
    for saddr, sport in flows:
        if proto == "icmp":
            flow = Flow(ipaddress.ip_address(saddr), 0, daddr, 0, _icmp_of(daddr.version))
        else:
            flow = Flow(ipaddress.ip_address(saddr), sport, daddr, port, proto)
        slot = owners.owner(flow_bucket(flow, topo.buckets, topo.seed, mode))
        out.append(None if slot is None else topo.members[slot])
    return out


def run_probe(
    state: LabState,
    proto: str = "tcp",
    connections: int = 1000,
    *,
    target: str | None = None,
    client: str = "c1",
    concurrency: int = 200,
    timeout: float = 3.0,
    port_seed: int | None = None,
    sources: int | None = None,
    progress: Progress | None = None,
    family: int = 4,
    flows: bool = False,
    rate: float = 0.0,
) -> ProbeResult:
    """Probe ``target`` (default: the traffic IP of ``family``) with ``connections`` flows
    from ``client``; the target's family decides the client's source addresses.  ``flows``:
    list every connection in the result (its node, expected node, and in a transparent lab
    its back end and the client address that back end saw).  ``rate`` (TCP/UDP): start at
    most that many flows a second (0: as fast as ``concurrency`` allows), so that a probe
    lasts long enough to span a fault injected while it runs."""
    topo = state.topology
    if proto not in PROTOCOLS:
        raise LabError(f"protocol {proto!r} is not one of {', '.join(PROTOCOLS)}")
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise LabError(f"concurrency: {concurrency} is outside 1..{MAX_CONCURRENCY}")
    if not 0 < timeout <= 60:
        raise LabError(f"timeout: {timeout} is outside (0, 60] seconds")
    if rate < 0 or (rate and proto == "icmp"):
        raise LabError(f"rate: {rate} must be >= 0, and is for tcp and udp probes only")
    src = topo.host(client)
    if src.role != "client":
        raise LabError(f"{client} is a node, not a client")
    try:
        target = target or topo.vip_of(family)
    except TopologyError as e:
        raise LabError(str(e)) from None
    family = ipaddress.ip_address(target).version
    if proto == "icmp" and topo.router is not None:
        raise LabError(
            "icmp probes find the node from the reply's source MAC, which a client behind "
            "the router never sees ('lab up --routed'); use tcp or udp"
        )
    if family == 6 and not src.addresses6:
        raise LabError(f"client {src.name} has no IPv6 address (use 'lab up --ipv6')")
    port = {"tcp": topo.port, "udp": topo.echo_port, "icmp": 0}[proto]
    seed = random.randrange(1 << 32) if port_seed is None else port_seed
    plan = plan_flows(src, proto, connections, seed, sources, family=family)
    expected = expected_nodes(
        topo, live=state.live, target=target, proto=proto, port=port, flows=plan
    )
    request = {
        "proto": proto,
        "target": target,
        "port": port,
        "flows": plan,
        "concurrency": concurrency,
        "timeout": timeout,
        "dup_wait": 0.1,
        "rate": rate,
        "interface": src.interface,
        "macs": {n.mac: n.name for n in topo.nodes},
    }
    result = ProbeResult(proto, target, connections, live=list(state.live), port_seed=seed)
    if proto == "icmp":
        result.hash_keys = len({saddr for saddr, _ in plan})
    result.predicted = dict(Counter(e or "(none)" for e in expected))
    before = backprobe.snapshot(state) if proto == "tcp" else None
    if target in topo.vips:
        owners = assign(slots_of(state.live, topo.members), topo.table)
        result.shares = {topo.members[s]: owners.share(s) for s in sorted(owners.live)}
    started = time.monotonic()
    rows = _run_worker(
        src.netns,
        request,
        total=connections,
        timeout=timeout,
        concurrency=concurrency,
        progress=progress,
    )
    result.seconds = time.monotonic() - started
    _tally(result, rows, plan, expected)
    if before is not None:
        result.transparency = backprobe.measure(state, before, rows, plan)
    if flows:
        result.flows = _per_flow(rows, plan, expected)
    return result


def _per_flow(
    rows: list[dict[str, Any]], plan: list[tuple[str, int]], expected: list[str | None]
) -> list[dict[str, Any]]:
    by_index = {int(r["i"]): r for r in rows}
    out = []
    for i, (saddr, sport) in enumerate(plan):
        r = by_index.get(i, {})
        entry: dict[str, Any] = {
            "flow": f"{saddr}:{sport}",
            "outcome": r.get("outcome", "failed"),
            "node": r.get("node") or None,
            "expected": expected[i],
        }
        if "backend" in r:
            entry["backend"] = r["backend"]
            entry["seen"] = r.get("seen")
        out.append(entry)
    return out


def _tally(
    result: ProbeResult,
    rows: list[dict[str, Any]],
    flows: list[tuple[str, int]],
    expected: list[str | None],
) -> None:
    seen: set[int] = set()
    result.by_flow = [None] * len(flows)
    answered: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    lost: Counter[str] = Counter()
    for row in rows:
        i = int(row["i"])
        seen.add(i)
        outcome = row["outcome"]
        if outcome == "answered":
            answered[row["node"]] += 1
            result.by_flow[i] = row["node"]
            if row["dups"]:
                result.duplicated += 1
            if row["node"] != expected[i]:
                result.mispredicted += 1
                if len(result.examples) < 5:
                    saddr, sport = flows[i]
                    result.examples.append(
                        {"flow": f"{saddr}:{sport}", "node": row["node"], "expected": expected[i]}
                    )
        elif outcome in ("reset", "timeout"):
            setattr(result, outcome, getattr(result, outcome) + 1)
            lost[expected[i] or "(none)"] += 1
        else:
            result.failed += 1
            errors[row.get("error") or "unknown"] += 1
            lost[expected[i] or "(none)"] += 1
    missing = len(flows) - len(seen)
    if missing:
        result.failed += missing
        errors["no result from worker"] += missing
        for i in set(range(len(flows))) - seen:
            lost[expected[i] or "(none)"] += 1
    result.unanswered_by_expected = dict(lost)
    result.answered = dict(answered)
    result.errors = dict(errors)


def _run_worker(
    netns: str,
    request: dict[str, Any],
    *,
    total: int,
    timeout: float,
    concurrency: int,
    progress: Progress | None,
) -> list[dict[str, Any]]:
    env = dict(os.environ)
    srcdir = str(Path(multihost.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (srcdir, env.get("PYTHONPATH")) if p)
    argv = ["ip", "netns", "exec", netns, sys.executable, "-m", "multihost.lab.probe_worker"]
    limit = (total / concurrency + 2) * (timeout + 1) + 30 + total / (request["rate"] or total)
    deadline = time.monotonic() + limit
    rows: list[dict[str, Any]] = []
    with subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        try:
            proc.stdin.write(json.dumps(request))
            proc.stdin.close()
            last = 0.0
            for line in proc.stdout:
                rows.append(json.loads(line))
                now = time.monotonic()
                if progress is not None and (now - last >= 1.0 or len(rows) == total):
                    progress(len(rows), total)
                    last = now
                if now > deadline:
                    raise LabError(f"probe worker still running after {limit:.0f}s")
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        err = proc.stderr.read().strip()
    if proc.returncode != 0:
        raise LabError(f"probe worker failed (status {proc.returncode}): {err[-300:]}")
    return rows
