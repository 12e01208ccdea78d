"""Benchmark: receive capacity and CPU of the nft flow filter vs no filter vs xt_cluster.

Run (root): .venv/bin/python bench/bench_dataplane.py [--quick] [--md bench/results_dataplane.md]
            [--json bench/results_dataplane.json]

Owns: the data-plane benchmark's run -- building the declared variants
(:mod:`bench.dp_variants`) in their namespaces, the generator, the interleaved UDP schedule
and its measurement, the XDP program alone under ``BPF_PROG_RUN``, and the command line
that ties in the TCP pass (:mod:`bench.dp_tcp`), the summaries and verdicts
(:mod:`bench.dp_summary`) and the report (a table, one JSON object, optionally the
BENCHMARKS.md section, :mod:`bench.dp_report`).

Must not: change anything outside the ``mhtB-<pid>-*`` namespaces it creates (see
:mod:`bench.dp_net`), or edit ``src``; the nft filter is the project's own
``render_install`` output applied by ``multihost.dataplane.nft.Dataplane``.

Method (details in the generated markdown):

* Traffic: an XDP program run with ``BPF_PROG_RUN`` + ``BPF_F_TEST_XDP_LIVE_FRAMES``
  (:mod:`bench.bpfgen`) returns ``XDP_TX`` for every frame, which the kernel turns into a
  transmission out of the sender veth into the receiver veth's NAPI ring.  Each frame is a
  60-byte UDP datagram to the traffic IP with the multicast destination MAC; the program
  stamps one of 16,384 flows (source address in 198.18.128.0/17, source port) per frame.
* The receiver's whole path (veth NAPI poll, skb build, GRO, IP, netfilter, UDP socket
  lookup and enqueue) runs as softirq on local_bh_enable *in the sending thread*, pinned to
  one CPU; so the thread's CPU time (CLOCK_THREAD_CPUTIME_ID, plus ksoftirqd of that CPU)
  divided by the packets that reached ``ip_rcv`` (``Ip.InReceives``) is the CPU cost per
  packet, unaffected by time other processes take from the CPU.  A calibration variant
  whose program returns ``XDP_DROP`` measures the generator alone; subtracting it gives the
  receive-side cost, whose inverse is the receive capacity of one CPU.
* Variants run interleaved, burst by burst within each round; ratios are per round against
  that round's no-filter run, then min/median/max over the rounds.  A second, short pass
  with 256 flows (cache-hot) separates cache misses from instruction cost.
* TCP: iperf3 through an accepted flow (client ports the worst-case node owns), with and
  without the filter and with xt_cluster, client and server pinned to the measured CPU.
  Over plain veth TCP crosses as GSO super-packets (XDP runs generic there).  A second pair
  runs over an emulated NIC (``dp_net.Lab.wire``): frames reach the receiver one MTU
  segment at a time as ``xdp_frame``s, where the program runs natively before the skb
  exists, GRO after it -- against the same wire without a filter.  A few more runs of that
  XDP row with the kernel's run-time statistics on (``--tcp-stat-runs``) give the program's
  own share of the saturated CPU, bounded by what the statistics' clock reads add (timed on
  the wire's one-call program): a capacity figure without the throughput's run-to-run noise.
  Last, a toggled A/B pass (``--tcp-ab-seconds``): one long stream over that wire while the
  program is detached and re-attached every 1.5 s, the mean rate with it over the mean rate
  without -- the comparison of the two rows without the minutes between them -- and an A/A
  control of the same schedule with nothing switched (``--tcp-aa-seconds``); optionally the
  same with an empty XDP_PASS program, the hook's own cost (``--tcp-floor-seconds``).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import bpfgen, dp_flows, dp_net, dp_report
from bench.dp_summary import load_report, stats, summarise, summarise_tcp, text, verdicts
from bench.dp_tcp import TcpRuns
from bench.dp_variants import (
    BUCKETS,
    CT_ONLY,
    DPORT,
    FEW_FLOWS,
    FEW_KEYS,
    FLOWS,
    GROUP,
    GROUP_IP,
    NODE,
    SEED,
    SLOTS,
    TCP_VARIANTS,
    VARIANTS,
    VIP,
    XDP_KINDS,
    Variant,
    flow_sets,
    min_filter,
    owned,
    spec,
    xt_rules,
)
from multihost.assignment import assign
from multihost.dataplane.nft import Dataplane, Nft, netns_entered
from multihost.dataplane.ruleset import GroupBuckets
from multihost.dataplane.xdp import XdpDataplane
from multihost.flowhash import Flow, flow_bucket
from multihost.macaddr import multicast_mac
from multihost.tablechoice import table_for


class Generator:
    """The BPF maps and programs: one flow map and one XDP_TX program per flow set."""

    def __init__(self, sets: dict[str, dp_flows.FlowSet]) -> None:
        self.fds: list[int] = []
        self.counter = self._fd(bpfgen.map_create(4, 4, 1))
        self.tx: dict[str, int] = {}
        self.drop: dict[str, int] = {}
        vip = ipaddress.IPv4Address(VIP).packed
        for name, fs in sets.items():
            fmap = self._fd(bpfgen.map_create(4, 8, len(fs)))
            for i, entry in enumerate(dp_flows.flow_entries(fs, vip)):
                bpfgen.map_update(fmap, i.to_bytes(4, "little"), entry)
            mask = len(fs) - 1
            self.tx[name] = self._fd(
                bpfgen.load_flow_program(self.counter, fmap, mask, bpfgen.XDP_TX)
            )
            self.drop[name] = self._fd(
                bpfgen.load_flow_program(self.counter, fmap, mask, bpfgen.XDP_DROP)
            )

    def _fd(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    def close(self) -> None:
        for fd in self.fds:
            bpfgen.close(fd)
        self.fds.clear()


class Bench:
    def __init__(self, args: argparse.Namespace, variants: tuple[Variant, ...], flows: int) -> None:
        self.variants = variants
        self.receivers = [v.key for v in variants if v.kind != "gen"]
        self.cpu: int = args.cpu if args.cpu is not None else max(os.sched_getaffinity(0))
        self.lab = dp_net.Lab(vip=VIP, dport=DPORT, pool=str(dp_flows.POOL))
        self.dataplanes: list[Dataplane] = []
        self.xdp: dict[str, XdpDataplane] = {}
        self.gen: Generator | None = None
        self.frames: dict[str, bytes] = {}
        self.ifindex: dict[str, int] = {}
        self.ksoftirqd = dp_net.ksoftirqd_pid(self.cpu)
        self.flows = flows
        self.bpffs: Path | None = None  # a BPF filesystem of its own for the XDP pins
        self.floor_fds: list[int] = []  # the floor programs and their links (closed: detached)

    # --- setup -------------------------------------------------------------------------
    def setup(self) -> dict[str, Any]:
        dp_flows.self_check(ipaddress.IPv4Address(VIP), DPORT, BUCKETS, SEED)
        rng = np.random.default_rng(20240601)
        t0 = time.perf_counter()
        sets = flow_sets(rng, self.flows)
        self.lab.open(self.receivers)
        info: dict[str, Any] = {"flow_sets_s": round(time.perf_counter() - t0, 2)}
        dst = multicast_mac(GROUP_IP)
        vip = ipaddress.IPv4Address(VIP).packed
        for key in self.receivers:
            self.ifindex[key] = dp_net.ifindex_of(self.lab.sender, f"s-{key}")
        src_mac = dp_net.mac_of(self.lab.sender, "s-none")
        for name, fs in sets.items():
            self.frames[name] = dp_flows.udp_frame(dst, src_mac, vip, DPORT, fs)
        self.gen = Generator(sets)
        installs: dict[str, float] = {}
        for v in self.variants:
            ns = self.lab.receivers.get(v.key, "")
            if v.kind == "ct":
                dp_net.ns_run(ns, "nft", "-f", "-", stdin=CT_ONLY)
            elif v.kind in ("min", "minb"):
                text = min_filter(owned(v.live), bitmap=v.kind == "minb")
                dp_net.ns_run(ns, "nft", "-f", "-", stdin=text)
            elif v.kind == "nft":
                dplane = Dataplane(spec(v.table), Nft(netns=ns))
                self.dataplanes.append(dplane)
                installs[v.key] = round(
                    dplane.install({GROUP: GroupBuckets(owned=owned(v.live, v.table))}) * 1000, 1
                )
            elif v.kind == "xt":
                for rule in xt_rules():
                    dp_net.ns_run(ns, "iptables", "-t", "mangle", "-A", "PREROUTING", *rule)
            elif v.kind == "xdp0":
                prog = bpfgen.load_action_program(2)
                self.floor_fds.append(prog)
                with netns_entered(ns):
                    self.floor_fds.append(bpfgen.xdp_link(prog, socket.if_nametoindex("r0")))
            elif v.kind in XDP_KINDS:
                x = self.attach_xdp(v.key, "native" if v.kind == "xdp" else "generic", v.table)
                mine = owned(v.live, v.table) if v.kind == "xdp" else frozenset(range(BUCKETS))
                if v.kind == "xdpg" and not v.live:
                    mine = frozenset()
                installs[v.key] = round(x.install({GROUP: GroupBuckets(owned=mine)}) * 1000, 1)
        info["nft_install_ms"] = installs
        info["xdp"] = {k: x.describe() for k, x in self.xdp.items()}
        info["ranges"] = {
            v.key: len(assign(v.live, table_for(SLOTS, v.table)).ranges(NODE))
            for v in self.variants
            if v.kind == "nft"
        }
        info["owned_buckets"] = {
            v.key: len(owned(v.live, v.table)) for v in self.variants if v.kind == "nft"
        }
        return info

    def attach_xdp(self, key: str, mode: str, table: str = "factorial") -> XdpDataplane:
        """The multihost program on the r0 of ``key``'s receiver (pinned in a BPF
        filesystem of the bench's own), removed by :meth:`close`."""
        if self.bpffs is None:  # a fresh machine has none mounted at /sys/fs/bpf
            self.bpffs = dp_net.mount_bpffs()
        ns = self.lab.receivers[key]
        x = XdpDataplane(spec(table), "r0", self.bpffs / f"{ns}-pins", netns=ns, mode=mode)
        self.xdp[key] = x
        return x

    def close(self) -> None:
        for d in self.dataplanes:
            d.nft.close()
        self.dataplanes.clear()
        for x in self.xdp.values():
            x.remove()
        self.xdp.clear()
        for fd in reversed(self.floor_fds):
            bpfgen.close(fd)
        self.floor_fds.clear()
        if self.gen is not None:
            self.gen.close()
        self.lab.close()
        if self.bpffs is not None:
            dp_net.unmount_bpffs(self.bpffs)
            self.bpffs = None

    # --- one packet run ----------------------------------------------------------------
    def fire(self, v: Variant, repeat: int) -> bpfgen.RunResult:
        assert self.gen is not None
        progs = self.gen.drop if v.kind == "gen" else self.gen.tx
        ifindex = self.ifindex["none" if v.kind == "gen" else v.key]
        with netns_entered(self.lab.sender):
            return bpfgen.prog_run_live(progs[v.flows], self.frames[v.flows], ifindex, repeat)

    def burst(self, v: Variant, repeat: int) -> dict[str, int]:
        """One ``BPF_PROG_RUN`` of ``repeat`` frames; raw counter deltas."""
        ns = self.lab.receivers.get(v.key)
        snap0 = dp_net.snmp(ns) if ns else {}
        xdp = self.xdp.get(v.key)
        seen0 = _xdp_seen(xdp)
        cpu0 = dp_net.cpu_times(self.cpu)
        k0 = dp_net.task_ns(self.ksoftirqd)
        w0, t0 = time.perf_counter_ns(), time.thread_time_ns()
        res = self.fire(v, repeat)
        w1, t1 = time.perf_counter_ns(), time.thread_time_ns()
        k1 = dp_net.task_ns(self.ksoftirqd)
        snap1: dict[str, int] = {}
        seen = 0
        if xdp is not None:  # dropped frames never reach IP: count what the program saw
            dp_net.settle(lambda: min(seen0 + repeat, _xdp_seen(xdp)), seen0 + repeat)
            seen = _xdp_seen(xdp) - seen0
            snap1 = dp_net.snmp(ns) if ns else {}
        elif ns:
            target = snap0["Ip.InReceives"] + repeat
            dp_net.settle(lambda: min(target, dp_net.snmp(ns)["Ip.InReceives"]), target)
            snap1 = dp_net.snmp(ns)
        cpu1 = dp_net.cpu_times(self.cpu)

        def d(key: str) -> int:
            return snap1.get(key, 0) - snap0.get(key, 0)

        out = {
            "sent": repeat,
            "received": seen if xdp is not None else d("Ip.InReceives") if ns else repeat,
            "delivered": d("Udp.InDatagrams") + d("Udp.RcvbufErrors"),
            "noports": d("Udp.NoPorts"),
            "wall_ns": w1 - w0,
            "thread_ns": t1 - t0,
            "ksoftirqd_ns": k1 - k0,
            "kernel_ns_per_frame": res.duration_ns,
            # the kernel's own clock of its run loop: wall time without the per-call setup
            # (repeat > 1 swaps the XDP dispatcher: ~25 ms asleep per call)
            "loop_ns": res.duration_ns * repeat,
        }
        # /proc/stat ticks of the pinned CPU over the whole burst window, which includes the
        # ~25 ms the call sleeps while the XDP dispatcher is swapped (others run then)
        out.update({f"ticks_{k}": cpu1[k] - cpu0[k] for k in cpu0})
        return out

    def round(self, repeat: int, bursts: int) -> list[dict[str, Any]]:
        """Every variant ``bursts`` times, interleaved burst by burst; per-variant totals."""
        for v in self.variants:
            self.fire(v, 2 * self.flows)  # warm-up: caches, conntrack entries of every flow
        sums: dict[str, dict[str, int]] = {v.key: {} for v in self.variants}
        per_burst: dict[str, list[float]] = {v.key: [] for v in self.variants}
        for _ in range(bursts):
            for v in self.variants:
                b = self.burst(v, repeat)
                for k, x in b.items():
                    sums[v.key][k] = sums[v.key].get(k, 0) + x
                per_burst[v.key].append((b["thread_ns"] + b["ksoftirqd_ns"]) / b["received"])
        out = []
        for v in self.variants:
            t = sums[v.key]
            received = max(t["received"], 1)
            out.append(
                {
                    "variant": v.key,
                    **{k: x for k, x in t.items() if k != "kernel_ns_per_frame"},
                    "accepted_share": round(t["delivered"] / received, 4),
                    "ns_per_pkt": (t["thread_ns"] + t["ksoftirqd_ns"]) / received,
                    "mpps_wall": received / (t["wall_ns"] / 1e3),
                    "mpps_loop": received / (t["loop_ns"] / 1e3),
                    "burst_ns_per_pkt": [round(x, 1) for x in per_burst[v.key]],
                }
            )
        return out

    def prog_ns(self, repeat: int = 200_000) -> dict[str, Any]:
        """The XDP program alone (``BPF_PROG_RUN`` with ``repeat``): ns per owned and per
        dropped frame, and the same for the no-filter pass-through of a non-VIP frame."""
        x = self.xdp.get("xdp2")
        if x is None:
            return {}
        vip = ipaddress.IPv4Address(VIP)
        out: dict[str, Any] = {}
        mine = owned((0, 1))
        rng = np.random.default_rng(7)
        for label, want in (("owned", True), ("dropped", False)):
            for _ in range(10_000):
                src = ipaddress.IPv4Address(int(rng.integers(0xC6128000, 0xC612FFFF)))
                port = int(rng.integers(1024, 65535))
                flow = Flow(src, port, vip, DPORT, "udp")
                if (flow_bucket(flow, BUCKETS, SEED) in mine) == want:
                    break
            frame = dp_flows.single_udp_frame(multicast_mac(GROUP_IP), flow)
            runs = [x.test_run(frame, repeat)[2] for _ in range(5)]
            out[f"{label}_ns"] = stats([float(r) for r in runs])
        return out

    def counters(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        nft_vs = [v for v in self.variants if v.kind == "nft"]
        for v, d in zip(nft_vs, self.dataplanes, strict=True):
            out[v.key] = d.counters()[GROUP]
        for key, x in self.xdp.items():
            out[key] = x.counters()[GROUP]
        for v in self.variants:
            if v.kind == "xt":
                out[v.key] = dp_net.ns_run(
                    self.lab.receivers[v.key], "iptables", "-t", "mangle", "-L", "PREROUTING",
                    "-v", "-x", "-n",
                ).strip().splitlines()[2:]  # fmt: skip
        return out


def _xdp_seen(x: XdpDataplane | None) -> int:
    """Frames the XDP program decided on (passed or dropped)."""
    if x is None:
        return 0
    c = x.counters()[GROUP]
    return c["accepted_packets"] + c["dropped_packets"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="3 short rounds (about a minute)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 5, quick 3)")
    ap.add_argument("--packets", type=int, help="frames per variant and round (default 2M)")
    ap.add_argument("--bursts", type=int, help="interleaved bursts per round (default 10)")
    ap.add_argument("--tcp-seconds", type=int, help="iperf3 seconds per run (default 2)")
    ap.add_argument("--tcp-rounds", type=int, help="interleaved iperf3 rounds (default 13)")
    ap.add_argument(
        "--tcp-stat-runs",
        type=int,
        default=5,
        help="(w) XDP runs with the kernel's run-time statistics on (default 5; 0: none)",
    )
    ap.add_argument(
        "--tcp-ab-seconds",
        type=int,
        help="length of the toggled A/B stream over the (w) XDP wire (default 120, quick 30; "
        "0: none)",
    )
    ap.add_argument(
        "--tcp-aa-seconds",
        type=int,
        help="length of the A/A control stream (the same schedule, nothing switched; "
        "default: half the A/B stream, 0: none)",
    )
    ap.add_argument(
        "--tcp-floor-seconds",
        type=int,
        default=0,
        help="length of the toggled floor stream: an empty XDP_PASS program toggled instead "
        "of multihost's, the cost of the XDP hook itself (default 0: none)",
    )
    ap.add_argument("--flows", type=int, default=FLOWS, help="flows per set (a power of 2)")
    ap.add_argument("--cpu", type=int, help="CPU to pin the generator to (default: highest)")
    ap.add_argument("--no-tcp", action="store_true", help="skip the iperf3 part")
    ap.add_argument("--no-few", action="store_true", help="skip the few-flows pass")
    ap.add_argument("--md", type=Path, help="write the BENCHMARKS.md section here")
    ap.add_argument("--json", type=Path, help="also write the JSON result here")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (namespaces, bpf)", file=sys.stderr)
        return 2
    rounds = args.rounds or (3 if args.quick else 5)
    packets = args.packets or (300_000 if args.quick else 2_000_000)
    tcp_seconds = args.tcp_seconds or 2
    tcp_rounds = args.tcp_rounds or (3 if args.quick else 13)
    ab_seconds = 30 if args.quick else 120
    ab_seconds = args.tcp_ab_seconds if args.tcp_ab_seconds is not None else ab_seconds
    aa_seconds = args.tcp_aa_seconds if args.tcp_aa_seconds is not None else ab_seconds // 2
    bursts = args.bursts or (4 if args.quick else 10)
    if args.flows < 2 or args.flows & (args.flows - 1):
        raise SystemExit("--flows must be a power of two >= 2")
    bench = Bench(args, VARIANTS, args.flows)
    os.sched_setaffinity(0, {bench.cpu})
    started = time.time()
    load0 = os.getloadavg()
    stat0, times0 = dp_net.cpu_times(None), os.times()
    try:
        info = bench.setup()
        runs: list[list[dict[str, Any]]] = []
        for n in range(rounds):
            rnd = bench.round(packets // bursts, bursts)
            runs.append(rnd)
            done = ", ".join(f"{r['variant']} {r['ns_per_pkt']:.0f}" for r in rnd)
            print(f"round {n + 1}/{rounds} (ns/pkt): {done}", file=sys.stderr)
        counters = bench.counters()
        prog_ns = bench.prog_ns()
        passes: dict[str, Any] = {}
        if not args.no_tcp:
            passes = TcpRuns(bench.lab, bench.cpu, bench.attach_xdp).run_all(
                TCP_VARIANTS,
                rounds=tcp_rounds,
                seconds=tcp_seconds,
                stat_runs=args.tcp_stat_runs,
                toggled={"ab": ab_seconds, "aa": aa_seconds, "floor": args.tcp_floor_seconds},
            )
        tcp_runs: list[list[dict[str, Any]]] = passes.get("runs", [])
        share, ab = passes.get("share", {}), passes.get("ab", {})
    finally:
        bench.close()
    few: dict[str, Any] = {}
    if not args.no_few:
        subset = tuple(v for v in VARIANTS if v.key in FEW_KEYS)
        small = Bench(args, subset, FEW_FLOWS)
        try:
            small.setup()
            few_runs = [small.round(packets // 4 // bursts, bursts) for _ in range(3)]
        finally:
            small.close()
        few = {"flows_per_set": FEW_FLOWS, "summary": summarise(few_runs, subset)}
        few["runs"] = few_runs
    summary = summarise(runs, VARIANTS)
    tcp = summarise_tcp(tcp_runs) if tcp_runs else {}
    result: dict[str, Any] = {
        "config": {
            "quick": args.quick,
            "rounds": rounds,
            "packets_per_variant_and_round": packets,
            "bursts_per_round": bursts,
            "flows_per_set": bench.flows,
            "frame_bytes": 60,
            "cpu": bench.cpu,
            "buckets": BUCKETS,
            "seed": SEED,
            "tcp_rounds": len(tcp_runs),
            "tcp_seconds": tcp_seconds,
            "tcp_ab_seconds": ab_seconds if not args.no_tcp else 0,
            "tcp_aa_seconds": aa_seconds if not args.no_tcp else 0,
            "tcp_floor_seconds": args.tcp_floor_seconds if not args.no_tcp else 0,
            "kernel": os.uname().release,
            "cpus": os.cpu_count(),
        },
        "setup": info,
        "tcp_setup": passes.get("info", {}),
        "load": load_report(load0, stat0, times0),
        "elapsed_s": round(time.time() - started, 1),
        "summary": summary,
        "tcp": tcp,
        "tcp_program_share": share,
        "tcp_toggled": ab,
        "tcp_toggled_control": passes.get("aa", {}),
        "tcp_toggled_floor": passes.get("floor", {}),
        "verdicts": verdicts(summary, tcp, few, share=share, prog_ns=prog_ns, toggled=ab),
        "few_flows": few,
        "filter_counters_total": counters,
        "xdp_program_ns": prog_ns,
        "runs": runs,
        "tcp_runs": tcp_runs,
    }
    print(text(result))
    print(json.dumps(result, separators=(",", ":")))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.md:
        args.md.write_text(dp_report.markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
