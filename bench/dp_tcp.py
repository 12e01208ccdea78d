"""The data-plane benchmark's TCP pass: iperf3 through an accepted flow.

Owns: the TCP clients and routes of each TCP variant (:meth:`TcpRuns.setup`), one iperf3
run of a variant (:meth:`TcpRuns.iperf`), the emulated NIC's (w) XDP row with the kernel's
run-time statistics on (:meth:`TcpRuns.program_share`), and the toggled A/B pass
(:meth:`TcpRuns.toggled`): one long iperf3 stream over the (w) XDP wire while the
multihost program is detached from and re-attached to the receiver's veth every few
hundred milliseconds, so that both states share the stream, the CPU and the minute.

Must not: create namespaces or load the multihost program itself (the :class:`Bench` of
:mod:`bench.bench_dataplane` does, through the ``attach`` callable, and cleans up), or
leave the toggled program detached: it is attached again before :meth:`TcpRuns.toggled`
returns, whatever happened.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import socket
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bench import bpfgen, dp_flows, dp_net
from bench.dp_summary import stats
from bench.dp_variants import (
    BUCKETS,
    GROUP,
    GROUP_IP,
    IPERF_PORT,
    SEED,
    SLOTS,
    VIP,
    WIRE_ROLES,
    owned,
    owned_mask,
)
from multihost.dataplane import libbpf
from multihost.dataplane.nft import netns_entered
from multihost.dataplane.ruleset import GroupBuckets
from multihost.dataplane.xdp import XdpDataplane
from multihost.macaddr import format_mac, multicast_mac

# (variant, mode) -> the multihost program attached on that variant's r0, registered with
# the caller for clean-up.
Attach = Callable[[str, str], XdpDataplane]

# One interval line of iperf3's client with --format m, e.g.
# "[  5]   1.25-1.50   sec   296 MBytes  9930 Mbits/sec    0   1.20 MBytes"
_INTERVAL = re.compile(r"\]\s+([\d.]+)-([\d.]+)\s+sec\s+([\d.]+)\s+MBytes\s+([\d.]+)\s+Mbits/sec")


class TcpRuns:
    def __init__(self, lab: dp_net.Lab, cpu: int, attach: Attach) -> None:
        self.lab = lab
        self.cpu = cpu  # client and server are pinned here
        self.attach = attach
        self.cports: list[int] = []
        self.clients: dict[str, str] = {}
        self.client_ns: dict[str, str] = {}  # the iperf3 client's namespace if not the sender
        self.wxdp: XdpDataplane | None = None

    def setup(self) -> dict[str, Any]:
        mac = format_mac(multicast_mac(GROUP_IP))
        i2 = self.lab.index["nft2"]
        clients = {"none": f"198.18.{self.lab.index['none']}.1", "nft2": f"198.18.{i2}.1"}
        ix = self.lab.index["xt"]
        for host in range(3, 255):
            addr = np.frombuffer(ipaddress.IPv4Address(f"198.18.{ix}.{host}").packed, np.uint8)
            if dp_flows.xt_cluster_nodes(addr.reshape(1, 4), SLOTS, SEED)[0] == 0:
                clients["xt"] = f"198.18.{ix}.{host}"
                break
        self.lab.tcp_route("none", clients["none"], None)
        self.lab.tcp_route("nft2", clients["nft2"], mac)
        self.lab.tcp_route("xt", clients["xt"], mac)
        if "xdpg" in self.lab.index:  # owns every bucket: any client port is its flow
            clients["xdpg"] = f"198.18.{self.lab.index['xdpg']}.1"
            self.lab.tcp_route("xdpg", clients["xdpg"], mac)
        for role in WIRE_ROLES:  # the emulated NIC: native XDP that owns every bucket
            self.lab.add(role)
            self.client_ns[role] = self.lab.wire(role, mac if role == "wxdp" else None)
            clients[role] = f"198.18.{self.lab.index[role]}.1"
            if role == "wxdp":
                self.wxdp = self.attach(role, "native")
                self.wxdp.install({GROUP: GroupBuckets(owned=frozenset(range(BUCKETS)))})
        # Ports the worst-case node owns for (nft2 client, any port, VIP, 5201): a run of 8
        # for the control connections (the ephemeral range of the sender namespace) and
        # single ones for the data connections (iperf3 --cport), a fresh one per run.
        ports = np.arange(1024, 65536, dtype=np.uint16)
        src = np.tile(
            np.frombuffer(ipaddress.IPv4Address(clients["nft2"]).packed, np.uint8), (len(ports), 1)
        )
        vip = ipaddress.IPv4Address(VIP).packed
        b = dp_flows.nft_buckets(src, ports, vip, IPERF_PORT, buckets=BUCKETS, seed=SEED)
        ok = owned_mask(owned((0, 1)))[b]
        starts = [i for i in range(len(ports) - 8) if ports[i] >= 40000 and ok[i : i + 8].all()]
        run8 = int(ports[starts[0]])
        self.cports = [int(p) for p, good in zip(ports, ok, strict=True) if good and p < 30000]
        dp_net.ns_run(
            self.lab.sender, "sysctl", "-qw", f"net.ipv4.ip_local_port_range={run8} {run8 + 7}"
        )
        self.clients = clients
        return {"clients": clients, "ephemeral_range": [run8, run8 + 7]}

    def run_all(
        self,
        variants: tuple[str, ...],
        *,
        rounds: int,
        seconds: int,
        stat_runs: int,
        toggled: dict[str, int],
    ) -> dict[str, Any]:
        """The whole TCP pass in order, with progress on stderr: set-up (``info``),
        ``rounds`` interleaved iperf3 rounds over ``variants`` (``runs``), the program's
        share (``share``), then the toggled streams of ``toggled`` seconds: ``ab`` (the
        program), ``aa`` (the control), ``floor`` (the empty program); 0 skips one."""
        out: dict[str, Any] = {"info": self.setup(), "runs": []}
        for n in range(rounds):
            out["runs"].append([self.iperf(k, seconds, n) for k in variants])
            done = ", ".join(f"{r['variant']} {r['gbps']:.1f}" for r in out["runs"][-1])
            print(f"tcp round {n + 1}/{rounds} (Gbit/s): {done}", file=sys.stderr)
        out["share"] = self.program_share(seconds, stat_runs)
        for key, what in (("ab", "A/B"), ("aa", "A/A control"), ("floor", "floor A/B")):
            if toggled.get(key):
                print(f"tcp toggled {what}, {toggled[key]} s ...", file=sys.stderr)
                out[key] = self.toggled(toggled[key], control=key == "aa", floor=key == "floor")
        return out

    def _client_args(self, key: str, n: int, seconds: int) -> tuple[str, ...]:
        cport = self.cports[(n * 7 + self.lab.index[key]) % len(self.cports)]
        return (
            "taskset", "-c", str(self.cpu),  # both ends on the measured CPU
            "iperf3", "-c", VIP, "-B", self.clients[key], "-p", str(IPERF_PORT),
            "--cport", str(cport), "-t", str(seconds),
        )  # fmt: skip

    def _server(self, key: str) -> Any:
        ns = self.lab.receivers[key]
        pin = ("taskset", "-c", str(self.cpu))
        # nobody reads the server's reports (the client's JSON carries what is used)
        server = self.lab.start(
            ns, *pin, "iperf3", "-s", "-1", "-B", VIP, "-p", str(IPERF_PORT), output=False
        )
        try:
            dp_net.wait_listen(ns, IPERF_PORT)
        except Exception:
            self.lab.stop(server)
            raise
        return server

    def iperf(self, key: str, seconds: int, n: int) -> dict[str, Any]:
        ns = self.lab.receivers[key]
        server = self._server(key)
        try:
            before = dp_net.snmp(ns)["Ip.InReceives"]
            out = dp_net.ns_run(
                self.client_ns.get(key, self.lab.sender),
                *self._client_args(key, n, seconds),
                "-J",
                check=False,
            )
            skbs = dp_net.snmp(ns)["Ip.InReceives"] - before
        finally:
            self.lab.stop(server)
        doc = json.loads(out)
        if "error" in doc:
            raise RuntimeError(f"iperf3 {key}: {doc['error']}")
        end = doc["end"]
        return {
            "variant": key,
            "gbps": end["sum_received"]["bits_per_second"] / 1e9,
            "seconds": end["sum_received"]["seconds"],
            # skbs through the receiver's netfilter hooks (GSO/GRO super-packets)
            "rx_skbs_per_s": skbs / end["sum_received"]["seconds"],
            "retransmits": end["sum_sent"].get("retransmits", 0),
            "cpu_client_pct": end["cpu_utilization_percent"]["host_total"],
            "cpu_server_pct": end["cpu_utilization_percent"]["remote_total"],
            # both ends share one CPU: throughput per CPU-second they (and the softirqs
            # run in their context) used, insensitive to time other processes take
            "gbit_per_cpu_s": end["sum_received"]["bits_per_second"]
            / 1e9
            / max(
                (
                    end["cpu_utilization_percent"]["host_total"]
                    + end["cpu_utilization_percent"]["remote_total"]
                )
                / 100,
                1e-9,
            ),
        }

    def program_share(self, seconds: int, runs: int) -> dict[str, Any]:
        """The XDP program's own CPU on the emulated NIC's TCP path: ``runs`` iperf3 runs of
        (w) XDP with the kernel's run-time statistics on (``BPF_ENABLE_STATS``), each giving
        ns per frame and the share of the (saturated) CPU spent in the program; without the
        program that CPU would carry 1 / (1 - share) as much, so 1 - share is the program's
        capacity ratio on this path, measured apart from the run-to-run noise of throughput."""
        x = self.wxdp
        if x is None or not runs:
            return {}
        prog_id = x.describe()["program_id"]
        # The wire's one-call program on the same frames: what the statistics' own two clock
        # reads add to a run (an upper bound: it includes bpf_redirect itself).
        wire_id = libbpf.prog_id(self.lab.wire_to_node["wxdp"])
        out: list[dict[str, float]] = []
        stats_fd = bpfgen.enable_run_time_stats()
        try:
            for n in range(runs):
                t0, c0 = _prog_stats(prog_id)
                w0, k0 = _prog_stats(wire_id)
                r = self.iperf("wxdp", seconds, 100 + n)
                t1, c1 = _prog_stats(prog_id)
                w1, k1 = _prog_stats(wire_id)
                wall, frames = r["seconds"], max(c1 - c0, 1)
                clock = (w1 - w0) / max(k1 - k0, 1)
                ns = (t1 - t0) / frames
                out.append(
                    {
                        "gbps": r["gbps"],
                        "frames_per_s": frames / wall,
                        "ns_per_frame": ns,
                        "wire_ns_per_frame": clock,
                        "cpu_share": ns * frames / (wall * 1e9),
                        "cpu_share_net": max(ns - clock, 0.0) * frames / (wall * 1e9),
                    }
                )
        finally:
            bpfgen.close(stats_fd)
        share = stats([e["cpu_share"] for e in out])
        net = stats([e["cpu_share_net"] for e in out])
        return {
            "runs": out,
            "ns_per_frame": stats([e["ns_per_frame"] for e in out]),
            "wire_ns_per_frame": stats([e["wire_ns_per_frame"] for e in out]),
            "frames_per_s": stats([e["frames_per_s"] for e in out]),
            "cpu_share": share,
            "cpu_share_net": net,
            # raw: the program as the statistics time it (its lower bound); net: less the
            # wire program's time, i.e. without the clock reads (its upper bound)
            "capacity_ratio": round(1 - share["median"], 4),
            "capacity_ratio_net": round(1 - net["median"], 4),
        }

    def toggled(
        self,
        seconds: int,
        interval: float = 0.25,
        hold: int = 4,
        settle: int = 2,
        *,
        control: bool = False,
        floor: bool = False,
    ) -> dict[str, Any]:
        """One iperf3 stream of ``seconds`` over the (w) XDP wire, reported every
        ``interval``; after every ``settle`` + ``hold`` intervals the multihost program is
        detached from the receiver's r0, or attached again (the same program and maps:
        detached, r0 is exactly the (w) no-filter receiver).  The ``settle`` intervals after
        each switch are not counted (in a first trial the first 0.25 s after attaching
        still ran 2.5 % slower than the rest of its stretch), nor the first two of the run
        (slow start).  ``control``: the same schedule and labels, nothing switched (an A/A
        run: what the estimate shows when there is no difference).  ``floor``: an empty
        program (``return XDP_PASS``) is toggled instead, the client sending to r0's own
        MAC in both states: the cost of any XDP program on this path, the hook itself.

        The figure is the pooled ratio -- the mean rate of the "on" stretches over that of
        the "off" ones -- with a 95 % bootstrap interval over (on, off) stretch pairs; see
        :func:`ab_summary`."""
        x = self.wxdp
        if x is None or seconds <= 0:
            return {}
        ns = self.lab.receivers["wxdp"]
        with netns_entered(ns):
            ifindex = socket.if_nametoindex("r0")
        assert x.attached is not None
        own_fd = libbpf.prog_fd_by_id(x.attached.program_id)
        # off: frames to r0's own MAC, as the (w) no-filter row's client resolves by ARP
        # (nothing else would make them PACKET_HOST); on: to the cluster's multicast MAC
        own = {
            False: format_mac(dp_net.mac_of(ns, "r0")),
            True: format_mac(multicast_mac(GROUP_IP)),
        }
        prog_fd, macs = own_fd, own
        mine = os.sched_getaffinity(0)
        others = set(range(os.cpu_count() or 1)) - {self.cpu}
        if others:  # this process reads and switches; keep it off the measured CPU
            os.sched_setaffinity(0, others)
        server = None
        state, skip, left = True, 2, hold  # on: attached (as set up)
        windows: list[dict[str, Any]] = []
        switch_ms: list[float] = []
        try:
            if floor:  # the empty program needs frames to r0's own MAC in both states
                prog_fd = bpfgen.load_action_program(bpfgen.XDP_PASS)
                macs = {True: own[False], False: own[False]}
                self._switch(False, ifindex, own_fd, own)
                self._switch(True, ifindex, prog_fd, macs)
            server = self._server("wxdp")
            client = self.lab.start(
                self.client_ns["wxdp"],
                *self._client_args("wxdp", 200, seconds),
                "-i", str(interval), "--format", "m", "--forceflush",
            )  # fmt: skip
            assert client.stdout is not None
            for line in client.stdout:
                m = _INTERVAL.search(line)
                if m is None or "sender" in line or "receiver" in line:
                    continue
                start, end, _, mbps = (float(g) for g in m.groups())
                if skip:
                    skip -= 1
                    continue
                windows.append({"on": state, "start": start, "end": end, "mbps": mbps})
                left -= 1
                if left == 0 and end < seconds - (settle + 1) * interval:
                    t0 = time.perf_counter()
                    if not control:
                        self._switch(not state, ifindex, prog_fd, macs)
                    switch_ms.append((time.perf_counter() - t0) * 1e3)
                    state, skip, left = not state, settle, hold
            rc = client.wait(timeout=seconds + 10)
            err = client.stderr.read() if client.stderr else ""
            self.lab.stop(client)
            if rc:
                raise RuntimeError(f"iperf3 wxdp (toggled): exit {rc}: {err.strip()}")
        finally:  # attached and fed as set up, whatever happened (re-attaching is a no-op)
            self._switch(True, ifindex, own_fd, own)
            for fd in {own_fd, prog_fd}:
                os.close(fd)
            if server is not None:
                self.lab.stop(server)
            os.sched_setaffinity(0, mine)
        return {
            "seconds": seconds,
            "interval_s": interval,
            "hold": hold,
            "settle": settle,
            "control": control,
            "floor": floor,
            **ab_summary(windows),
            "switch_ms": stats(switch_ms) if switch_ms else None,
            "counted": [[int(w["on"]), w["start"], w["mbps"]] for w in windows],
        }

    def _switch(self, on: bool, ifindex: int, prog_fd: int, macs: dict[bool, str]) -> None:
        """Attach (``on``) or detach the program on the wxdp receiver's r0, the client's
        neighbour entry changed on the side where neither state drops a frame: the program
        is attached before frames go to the multicast MAC, and detached only after they go
        to r0's own again."""
        ns, client = self.lab.receivers["wxdp"], self.client_ns["wxdp"]
        neigh = f"neigh replace {VIP} lladdr {macs[on]} dev c0 nud permanent"
        if not on:
            dp_net.ip_batch(client, [neigh])
        with netns_entered(ns):
            if on:
                libbpf.xdp_attach(ifindex, prog_fd, libbpf.XDP_FLAGS_DRV_MODE)
            else:
                libbpf.xdp_detach(ifindex, libbpf.XDP_FLAGS_DRV_MODE)
            attached = libbpf.xdp_query_id(ifindex, libbpf.XDP_FLAGS_DRV_MODE)
        if bool(attached) != on:
            raise RuntimeError(f"r0 in {ns}: the program is still {'off' if on else 'on'}")
        if on:
            dp_net.ip_batch(client, [neigh])


def ab_summary(windows: list[dict[str, Any]], resamples: int = 4000) -> dict[str, Any]:
    """The toggled pass's estimate from its counted intervals (``on``, ``mbps``).

    Consecutive intervals of one state form a stretch (states alternate).  ``pooled_ratio``:
    the mean of the "on" stretches' rates over that of the "off" ones; ``pooled_ci95``: its
    95 % percentile interval over ``resamples`` bootstrap draws of (on, following off)
    stretch pairs (fixed seed).  Also, per "on" stretch, its rate over the mean of the two
    "off" stretches beside it, whose median cancels a linear drift but, a ratio of noisy
    rates, leans high (A/A runs at 0.1 s stretches gave 1.02-1.03): reported, not judged."""
    blocks: list[tuple[bool, list[float]]] = []
    for w in windows:
        if blocks and blocks[-1][0] == w["on"]:
            blocks[-1][1].append(w["mbps"])
        else:
            blocks.append((w["on"], [w["mbps"]]))
    means = [(on, statistics.fmean(v)) for on, v in blocks]
    ratios = [
        means[i][1] / ((means[i - 1][1] + means[i + 1][1]) / 2)
        for i in range(1, len(means) - 1)
        if means[i][0] and not means[i - 1][0] and not means[i + 1][0]
    ]
    on = np.array([m for o, m in means if o])
    off = np.array([m for o, m in means if not o])
    out: dict[str, Any] = {
        "windows": len(windows),
        "on_blocks": len(on),
        "off_blocks": len(off),
        "on_gbps": round(float(on.mean()) / 1e3, 3) if len(on) else None,
        "off_gbps": round(float(off.mean()) / 1e3, 3) if len(off) else None,
        "ratios": [round(r, 4) for r in ratios],
    }
    if len(on) and len(off):
        out["pooled_ratio"] = round(float(on.mean() / off.mean()), 4)
        pairs = min(len(on), len(off))
        if pairs >= 2:
            pick = np.random.default_rng(1).integers(0, pairs, size=(resamples, pairs))
            boot = on[:pairs][pick].mean(axis=1) / off[:pairs][pick].mean(axis=1)
            lo, hi = np.percentile(boot, [2.5, 97.5])
            out["pooled_ci95"] = [round(float(lo), 4), round(float(hi), 4)]
    if ratios:
        out["ratio"] = stats(ratios)
        lo, hi = median_ci(ratios)
        out["ratio_ci95"] = [round(lo, 4), round(hi, 4)]
    return out


def median_ci(values: list[float], z: float = 1.96) -> tuple[float, float]:
    """Distribution-free confidence interval of the median: the order statistics at
    n/2 -+ z * sqrt(n)/2 (the normal approximation of the binomial; the whole range if
    n < 8)."""
    v = sorted(values)
    n = len(v)
    half = z * math.sqrt(n) / 2
    lo, hi = math.floor(n / 2 - half), math.ceil(n / 2 + half) - 1
    return v[max(lo, 0)], v[min(hi, n - 1)]


def _prog_stats(prog_id: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of a program (0, 0 while statistics were never on)."""
    info = json.loads(dp_net.run("bpftool", "-j", "prog", "show", "id", str(prog_id)))
    return int(info.get("run_time_ns", 0)), int(info.get("run_cnt", 0))
