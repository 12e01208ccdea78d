"""Benchmark: agent CPU at idle, and false failovers vs heartbeat interval, idle and with
both cores busy.

Run (root): .venv/bin/python bench/bench_agent_cpu.py [--seconds 60]
            [--intervals 100,50,20,10] [--skip-cpu] [--skip-stability] [--md] [--plot]

Owns:

* *Idle CPU*: an 8-node lab (``mhtFc-``, 100 ms heartbeats), converged and quiet; each
  agent's utime + stime from ``/proc/<pid>/stat`` (all threads) over ``--seconds``; CPU as
  a share of one core, per agent.
* *Stability*: per heartbeat interval, a 4-node lab (``mhtFs-``, dead_after = 4 intervals,
  raised to 110 ms where the agents refuse less -- their lease margin is a fixed 50 ms),
  then two windows of ``--seconds`` without any fault, idle first, then with two busy
  loops (``python -c 'while 1: pass'``, started and killed by PID); counts the agents'
  ``view-changed``/``member-dead``/``lease-lapsed`` log lines in each window (any is a false
  failover: nothing failed) and the longest gap between two heartbeats of one node seen on
  the switch (``tcpdump`` in the switch namespace).  Also each agent's CPU in the window.

Results: the ``cpu`` and ``stability`` parts of ``bench/results_failover.json``.

Must not: touch anything but its own labs and the processes it starts (by PID).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import fo_common as fc
from multihost.lab import agents, failover
from multihost.lab.state import LabError, LabState

TICK = os.sysconf("SC_CLK_TCK")
TARGET_CPU = 1.0  # % of one core
MIN_DEAD_AFTER_MS = 110
FALSE_EVENTS = ("view-changed", "member-dead", "lease-lapsed")


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)


def agent_pids(state: LabState) -> dict[str, int]:
    out = {}
    for n in state.topology.members:
        rec = agents.agent_record(state, n)
        assert rec is not None
        out[n] = int(rec["pid"])
    return out


def cpu_window(state: LabState, seconds: float) -> dict[str, float]:
    """Per agent, % of one core over ``seconds``."""
    pids = agent_pids(state)
    before = {n: cpu_ticks(p) for n, p in pids.items()}
    t0 = time.monotonic()
    time.sleep(seconds)
    dt = time.monotonic() - t0
    return {n: round(100 * (cpu_ticks(p) - before[n]) / TICK / dt, 2) for n, p in pids.items()}


class GapWatch:
    """tcpdump in the switch namespace: the longest gap between heartbeats per sender."""

    def __init__(self, state: LabState) -> None:
        sw = state.topology.switch.netns
        argv = ["ip", "netns", "exec", sw, "tcpdump", "-i", "any", "-n", "-tt", "-l", "-q"]
        argv += ["inbound and udp port 7946"]
        self.path = state.directory / "heartbeats.txt"
        self.out = open(self.path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(argv, stdout=self.out, stderr=subprocess.DEVNULL)

    def stop(self) -> dict[str, float]:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.out.close()
        last: dict[str, float] = {}
        gap: dict[str, float] = {}
        for line in self.path.read_text().splitlines():
            parts = line.split()
            if len(parts) < 3 or parts[2] != "M":
                continue
            t, port = float(parts[0]), parts[1]
            if port in last:
                gap[port] = max(gap.get(port, 0.0), t - last[port])
            last[port] = t
        return {p.removeprefix("p-"): round(g * 1000, 1) for p, g in sorted(gap.items())}


def idle_cpu(seconds: float, backend: str | None = None, windows: int = 1) -> dict[str, Any]:
    """``windows`` back-to-back windows of ``seconds`` on one lab; the result is the
    window with the median median (all windows' medians are listed in ``window_medians``)."""
    runs: list[tuple[dict[str, float], str]] = []
    with fc.lab("mhtFc-", 8, backend=backend) as state:
        failover.wait_converged(state, list(state.topology.members), quiet=True, timeout=90)
        time.sleep(3)
        cursor = failover.LogCursor(state)
        for _ in range(windows):
            load = fc.loadavg()
            cpu = cpu_window(state, seconds)
            fc.log(f"idle CPU, 8 agents at 100 ms: {cpu} (load {load})")
            runs.append((cpu, load))
        events = {e: len(cursor.events(e)) for e in FALSE_EVENTS}
        dataplane = state.agents.get("dataplane", {})
    medians = [fc.summary(list(cpu.values()))["p50"] for cpu, _ in runs]
    cpu, load = runs[sorted(range(len(runs)), key=lambda i: medians[i])[len(runs) // 2]]
    return {
        "nodes": 8,
        "heartbeat_ms": 100,
        "seconds": seconds,
        "cpu_percent": cpu,
        "summary": fc.summary(list(cpu.values())),
        "window_medians": medians,
        "dataplane": dataplane,
        "events": events,
        "loadavg": load,
    }


def stability_window(state: LabState, seconds: float, hogs: int) -> dict[str, Any]:
    cursor = failover.LogCursor(state)
    load0 = fc.loadavg()
    watch = GapWatch(state)
    try:
        with fc.busy_loops(hogs):
            cpu = cpu_window(state, seconds)
            load1 = fc.loadavg()
    finally:
        gaps = watch.stop()
    events = {e: len(cursor.events(e)) for e in FALSE_EVENTS}
    return {
        "busy_loops": hogs,
        "events": events,
        "false_failovers": events["member-dead"],
        "max_gap_ms": gaps,
        "cpu_percent": cpu,
        "loadavg": [load0, load1],
    }


def stability(intervals: list[int], seconds: float, save: Any = None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for ms in intervals:
        dead = max(4 * ms, MIN_DEAD_AFTER_MS)
        row: dict[str, Any] = {"heartbeat_ms": ms, "dead_after_ms": dead, "raised": dead != 4 * ms}
        out.append(row)
        try:
            with fc.lab("mhtFs-", 4, heartbeat_ms=ms, dead_after_ms=dead) as state:
                members = list(state.topology.members)
                failover.wait_converged(state, members, quiet=True, timeout=90)
                time.sleep(2)
                for label, hogs in (("idle", 0), ("loaded", 2)):
                    # A false failover of the previous window must heal before measuring.
                    failover.wait_converged(state, members, timeout=60)
                    w = stability_window(state, seconds, hogs)
                    row[label] = w
                    fc.log(
                        f"{ms} ms (dead {dead}) {label}: events {w['events']}, max gap "
                        f"{max(w['max_gap_ms'].values(), default=0)} ms, cpu {w['cpu_percent']}"
                    )
        except LabError as e:  # the lab never settled: that is the result for this interval
            row["error"] = str(e)
            fc.log(f"{ms} ms: FAILED: {e}")
        if save is not None:
            save(out)
    return out


def report_cpu(c: dict[str, Any]) -> str:
    s = c["summary"]
    ok = "met" if s["max"] <= TARGET_CPU else "NOT met"
    return (
        f"| {c['nodes']} agents, {c['heartbeat_ms']} ms heartbeats, {c['seconds']:.0f} s | "
        f"{s['min']} / {s['p50']} / {s['max']} | {ok} (max / target = "
        f"{s['max'] / TARGET_CPU:.1f}) | {sum(c['events'].values())} |"
    )


def report_stability(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| heartbeat | dead_after | idle: false failovers / lease lapses / max gap | "
        "loaded (2 busy loops): false failovers / lease lapses / max gap | agent CPU idle / "
        "loaded (% core, median) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            what = "never converged" if "converge" in r["error"] else "did not start"
            lines.append(
                f"| {r['heartbeat_ms']} ms | {r['dead_after_ms']} ms | lab {what}: "
                f"{r['error'][:160]} | | |"
            )
            continue
        cells = []
        for label in ("idle", "loaded"):
            w = r[label]
            gap = max(w["max_gap_ms"].values(), default=0.0)
            cells.append(
                f"{w['events']['member-dead']} / {w['events']['lease-lapsed']} / {gap:.0f} ms"
            )
        cpu = [
            fc.summary(list(r[k]["cpu_percent"].values())).get("p50", 0) for k in ("idle", "loaded")
        ]
        mark = " (raised; 4x is refused)" if r["raised"] else ""
        lines.append(
            f"| {r['heartbeat_ms']} ms | {r['dead_after_ms']} ms{mark} | {cells[0]} | {cells[1]}"
            f" | {cpu[0]} / {cpu[1]} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0, help="per window (default 60)")
    ap.add_argument("--intervals", default="100,50,20,10", help="heartbeat ms, comma-separated")
    ap.add_argument("--skip-cpu", action="store_true")
    ap.add_argument("--skip-stability", action="store_true")
    ap.add_argument("--md", action="store_true", help="rewrite bench/results_failover.md")
    ap.add_argument("--plot", action="store_true", help="rewrite bench/failover.png")
    ap.add_argument(
        "--backend", choices=("auto", "xdp", "nft"), default="auto", help="idle CPU: data plane"
    )
    ap.add_argument("--windows", type=int, default=1, help="idle CPU: windows on one lab")
    args = ap.parse_args()
    cmd = f".venv/bin/python bench/bench_agent_cpu.py --seconds {args.seconds:g}"
    if not args.skip_cpu:
        backend = None if args.backend == "auto" else args.backend
        c = idle_cpu(args.seconds, backend, args.windows)
        extra = (f" --backend {args.backend}" if backend else "") + (
            f" --windows {args.windows}" if args.windows != 1 else ""
        )
        c.update(machine=fc.machine(), command=cmd + " --skip-stability" + extra)
        fc.save_part("cpu" if backend is None else f"cpu-{backend}", c)
        print("| setup | agent CPU % of one core: min / median / max | target <= 1 % | events |")
        print("|---|---|---|---|")
        print(report_cpu(c))
    if not args.skip_stability:
        info = fc.machine()
        command = cmd + f" --intervals {args.intervals} --skip-cpu"

        def save(rows: list[dict[str, Any]]) -> None:
            info["loadavg_end"] = fc.loadavg()
            fc.save_part("stability", {"machine": info, "rows": rows, "command": command})

        rows = stability([int(x) for x in args.intervals.split(",")], args.seconds, save)
        print(report_stability(rows))
    if args.md or args.plot:
        from bench.fo_report import rewrite  # (fo_report imports the benches)

        rewrite(md=args.md, figure=args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
