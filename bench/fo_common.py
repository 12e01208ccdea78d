"""Shared parts of the failover benchmarks (bench_failover, bench_keepalived,
bench_agent_cpu): labs with a fixed prefix, statistics, agent logs and metrics, and the
results file every part writes its section into.

Owns: :func:`lab` (build a lab under an ``mhtF``-prefix, always removed afterwards),
:func:`summary` (nearest-rank percentiles), :func:`kernel_updates` (``kernel-updated
took_ms`` from the agents' logs), :func:`scrape_reprogram` (the agents'
``multihost_reprogram_seconds`` histogram, read inside the node's namespace),
:func:`busy_loops` (CPU hogs started and killed by PID), and ``bench/results_failover.json``
(:func:`save_part`, :func:`load_parts`).

Must not: touch a lab, namespace or process that it did not create, or edit ``src``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from multihost.lab import build
from multihost.lab.clean import clean, proc_start_time
from multihost.lab.failover import LogCursor
from multihost.lab.naming import PREFIX_ENV, state_dir, validate_prefix
from multihost.lab.state import LabState
from multihost.lab.topology import describe

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results_failover.json"
METRICS_URL = "http://127.0.0.1:9650/metrics"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def own_prefix(prefix: str) -> str:
    """``prefix`` (an ``mhtF`` benchmark prefix) under ``$MULTIHOST_LAB_PREFIX`` if set."""
    if not validate_prefix(prefix).startswith("mhtF"):
        raise ValueError(f"benchmark labs use mhtF prefixes, not {prefix!r}")
    own = os.environ.get(PREFIX_ENV)
    if not own:
        return prefix
    return validate_prefix(validate_prefix(own)[:-1] + prefix.removeprefix("mhtF"))


def lab_backend(backend: str | None) -> dict[str, Any]:
    """``build.build``'s keyword for a data plane backend: nothing unless one is asked for;
    ValueError if this lab cannot choose one."""
    if backend is None:
        return {}
    if "backend" not in inspect.signature(build.build).parameters:
        raise ValueError(f"this lab has no data plane backends (asked for {backend!r})")
    return {"backend": backend}


@contextlib.contextmanager
def lab(
    prefix: str,
    nodes: int,
    *,
    heartbeat_ms: int | None = None,
    dead_after_ms: int | None = None,
    metrics: bool = False,
    with_agents: bool = True,
    backend: str | None = None,
    table: str = "factorial",
    ipv6: bool = False,
) -> Iterator[LabState]:
    """A lab under ``prefix`` (must start with ``mhtF``), removed whatever happens;
    ``backend``: the data plane backend, passed on only when given (:func:`lab_backend`);
    ``table``: the agents' ``[cluster] table``; ``ipv6``: the dual-stack lab (``lab up
    --ipv6``: heartbeats over IPv6, an IPv6 traffic IP beside the IPv4 one).

    ``$MULTIHOST_LAB_PREFIX`` (say ``mhG-``), when set, replaces the ``mhtF`` part:
    ``mhtFc-`` becomes ``mhGc-``, so people sharing a machine keep to their own labs.
    """
    prefix = own_prefix(prefix)
    extra = lab_backend(backend)
    clean(prefix)  # leftovers of an earlier, killed run of this very benchmark
    try:
        yield build.build(
            describe(nodes, 1, prefix, table_kind=table, ipv6=ipv6),
            with_agents=with_agents,
            heartbeat_ms=heartbeat_ms,
            dead_after_ms=dead_after_ms,
            metrics=metrics,
            **extra,
        )
    except BaseException:
        keep_evidence(prefix)
        raise
    finally:
        clean(prefix)


EVIDENCE = Path("/tmp/multihost-bench-evidence")


def keep_evidence(prefix: str) -> Path | None:
    """Copy the lab's logs and state (not its key) before the lab is removed."""
    src = state_dir(prefix)
    if not src.is_dir():
        return None
    dst = EVIDENCE / f"{prefix}{time.strftime('%H%M%S')}"
    dst.mkdir(parents=True, exist_ok=True)
    for f in [*src.glob("*.log"), *src.glob("*.json"), *src.glob("*.txt"), *src.glob("*.conf")]:
        shutil.copy2(f, dst / f.name)
    log(f"evidence of {prefix} kept in {dst}")
    return dst


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty sample."""
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def summary(values: Sequence[float | None]) -> dict[str, Any]:
    """n, missing, min, p50, p90, p99, max, mean of the non-None values."""
    v = [float(x) for x in values if x is not None]
    out: dict[str, Any] = {"n": len(v), "missing": len(values) - len(v)}
    if v:
        out.update(
            min=round(min(v), 1),
            p50=round(percentile(v, 50), 1),
            p90=round(percentile(v, 90), 1),
            p99=round(percentile(v, 99), 1),
            max=round(max(v), 1),
            mean=round(sum(v) / len(v), 1),
        )
    return out


def steady(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trials whose failure hit a lab in its steady state (see ``failover.analyse``;
    rows recorded before that flag existed: the failed node answered before and after)."""

    def ok(f: dict[str, Any]) -> bool:
        if "steady_before" in f:
            return bool(f["steady_before"])
        return bool(f["answered_before"] and f["answered_by_failed"])

    return [r for r in rows if ok(r["flows"])]


def fmt(s: dict[str, Any], key: str) -> str:
    return "-" if key not in s else f"{s[key]:.0f}" if s[key] >= 10 else f"{s[key]:.1f}"


_TOOK = re.compile(r'reason="epoch \d+".* took_ms=([0-9.]+)')


def kernel_updates(cursor: LogCursor, nodes: Sequence[str]) -> list[float]:
    """``took_ms`` of the view-change reprogrammings (``reason="epoch N"``) since ``cursor``."""
    out: list[float] = []
    for node in nodes:
        for line in cursor.lines(node):
            m = _TOOK.search(line)
            if m and " event=kernel-updated " in line:
                out.append(float(m.group(1)))
    return out


_BUCKET = re.compile(r'^multihost_reprogram_seconds_bucket\{.*le="([^"]+)".*\} ([0-9.e+]+)$')


def scrape_reprogram(state: LabState, node: str) -> dict[str, float]:
    """The node agent's reprogram histogram: cumulative count per ``le`` bound."""
    netns = state.topology.host(node).netns
    fetch = f"urllib.request.urlopen({METRICS_URL!r}, timeout=2).read().decode()"
    code = f"import urllib.request; print({fetch})"
    out = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )
    hist: dict[str, float] = {}
    for line in out.stdout.splitlines():
        m = _BUCKET.match(line.strip())
        if m:
            hist[m.group(1)] = hist.get(m.group(1), 0.0) + float(m.group(2))
    return hist


def hist_delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


@contextlib.contextmanager
def busy_loops(n: int) -> Iterator[list[int]]:
    """``n`` CPU hogs (``python -c 'while 1: pass'``), killed by PID on exit."""
    procs = [
        subprocess.Popen([sys.executable, "-c", "while 1: pass"], stdin=subprocess.DEVNULL)
        for _ in range(n)
    ]
    starts = [proc_start_time(p.pid) for p in procs]
    try:
        yield [p.pid for p in procs]
    finally:
        for p, start in zip(procs, starts, strict=True):
            if p.poll() is None and proc_start_time(p.pid) == start:
                os.kill(p.pid, signal.SIGKILL)
            p.wait()


def save_part(name: str, data: Any) -> None:
    parts = load_parts()
    parts[name] = data
    RESULTS.write_text(json.dumps(parts, indent=1) + "\n")


def load_parts() -> dict[str, Any]:
    try:
        loaded: dict[str, Any] = json.loads(RESULTS.read_text())
        return loaded
    except (OSError, ValueError):
        return {}


def machine() -> dict[str, Any]:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "loadavg_start": loadavg(),
    }
