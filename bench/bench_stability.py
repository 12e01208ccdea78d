"""False failovers at the default timing (root): a converged 4-node lab left alone, idle and
then with ``stress-ng`` loading every core, counting every ``member-dead`` (nothing fails,
so each is a false failover), lease lapses, suspicions and view changes, and the longest
gap between two heartbeats of one sender seen on the switch; also the same events (and the
agents' pauses) from the agents' start until the lab converged (`startup`).

Run (root): .venv/bin/python bench/bench_stability.py --heartbeat-ms 20 --seconds 600
            [--windows idle,stress] [--prefix mhtFs-] [--out FILE]

Owns: one lab under ``--prefix`` (must start with ``mhtF``; removed afterwards) whose
agents use the configuration's defaults for everything but the heartbeat interval
(dead_after = 2 x interval + 30 ms, lease margin and jitter following the interval); the
``stress-ng --cpu 0`` process it starts for the ``stress`` window (one worker per CPU,
killed by PID).  Heartbeat gaps and CPU come from ``bench_agent_cpu``'s helpers.

Must not: touch any lab, namespace or process it did not create.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import fo_common as fc
from bench.bench_agent_cpu import GapWatch, cpu_window
from multihost.config import default_dead_after_ms
from multihost.lab import failover
from multihost.lab.clean import proc_start_time
from multihost.lab.state import LabState

EVENTS = ("member-dead", "lease-lapsed", "peer-suspect", "view-changed", "loop-late", "paused")


@contextlib.contextmanager
def stress(on: bool) -> Iterator[int | None]:
    """``stress-ng --cpu 0`` (every CPU) while inside; killed by PID (and its workers by
    process group, which it leads) on exit."""
    if not on:
        yield None
        return
    exe = shutil.which("stress-ng")
    if exe is None:
        raise SystemExit("stress-ng is not installed (apt-get install stress-ng)")
    proc = subprocess.Popen(
        [exe, "--cpu", "0", "--cpu-load", "100", "--quiet"],
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    start = proc_start_time(proc.pid)
    try:
        yield proc.pid
    finally:
        if proc.poll() is None and proc_start_time(proc.pid) == start:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def window(state: LabState, seconds: float, loaded: bool) -> dict[str, Any]:
    cursor = failover.LogCursor(state)
    load0 = fc.loadavg()
    watch = GapWatch(state)
    try:
        with stress(loaded):
            cpu = cpu_window(state, seconds)
            load1 = fc.loadavg()
    finally:
        gaps = watch.stop()
    events = {e: len(cursor.events(e)) for e in EVENTS}
    return {
        "stress": loaded,
        "seconds": seconds,
        "events": events,
        "false_failovers": events["member-dead"],
        "max_gap_ms": gaps,
        "cpu_percent": cpu,
        "loadavg": [load0, load1],
    }


def startup(state: LabState) -> dict[str, Any]:
    """The agents' events from their start to now (the lab just converged): false
    failovers and pauses while the others were still starting."""
    cursor = failover.LogCursor(state)
    cursor.offsets = dict.fromkeys(cursor.offsets, 0)
    paused = [float(line.rsplit("ms=", 1)[1]) for line in cursor.events("paused")]
    return {
        "events": {e: len(cursor.events(e)) for e in EVENTS},
        "paused_over_50ms": sum(ms > 50 for ms in paused),
        "paused_max_ms": max(paused, default=0.0),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--heartbeat-ms", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=600.0, help="per window")
    ap.add_argument("--windows", default="idle,stress")
    ap.add_argument("--prefix", default="mhtFs-")
    ap.add_argument("--out", help="write the JSON here")
    args = ap.parse_args()
    ms = args.heartbeat_ms
    result: dict[str, Any] = {
        "machine": fc.machine(),
        "heartbeat_ms": ms,
        "dead_after_ms": default_dead_after_ms(ms),
        "command": " ".join(["bench/bench_stability.py", *sys.argv[1:]]),
        "windows": {},
    }
    with fc.lab(args.prefix, 4, heartbeat_ms=ms) as state:
        members = list(state.topology.members)
        failover.wait_converged(state, members, quiet=True, timeout=90)
        time.sleep(2)
        result["startup"] = startup(state)
        fc.log(f"{ms} ms start-up: {result['startup']}")
        for name in args.windows.split(","):
            failover.wait_converged(state, members, timeout=60)
            w = window(state, args.seconds, name == "stress")
            result["windows"][name] = w
            fc.log(
                f"{ms} ms {name}: events {w['events']}, max gap "
                f"{max(w['max_gap_ms'].values(), default=0)} ms, cpu {w['cpu_percent']}, "
                f"load {w['loadavg']}"
            )
            if args.out:
                Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
