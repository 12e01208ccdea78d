"""The BENCHMARKS.md section of the data-plane benchmark, rendered from its JSON result.

Owns: the wording of the section (command, method, tables, verdicts, caveats) and which
numbers of the result it quotes.

Must not: measure, run commands or touch the system; it only formats a finished result.
"""

from __future__ import annotations

import time
from typing import Any

_MAIN = ("none", "ct", "min", "minb", "nft8", "nft4", "nft2", "nftN", "xt", "xtN")
_LIVE = {"nft8": "8 of 8 live", "nft4": "4 of 8 live", "nft2": "2 of 8 live (worst case)"}


def _r(x: dict[str, float]) -> str:
    return f"{x['min']:.2f} / **{x['median']:.2f}** / {x['max']:.2f}"


def _load(result: dict[str, Any]) -> str:
    load = result["load"]
    return (
        f"load average {load['loadavg_start'][0]:.2f} at start, "
        f"{load['loadavg_end'][0]:.2f} at end; other processes kept "
        f"{load['other_busy_share']:.0%} of the 2 CPUs' time busy during the run, the "
        f"hypervisor stole {load['steal_share']:.1%}"
    )


def _ksoftirqd(result: dict[str, Any]) -> float:
    rows = [r for rnd in result["runs"] for r in rnd]
    ksoft = float(sum(r["ksoftirqd_ns"] for r in rows))
    return ksoft / float(max(sum(r["thread_ns"] for r in rows), 1))


def _gap(summary: dict[str, Any]) -> float:
    """Added ns/pkt of the hash-set rule minus that of the bitmap rule."""
    added = (summary[k]["added_ns_per_pkt"]["median"] for k in ("min", "minb"))
    return float(next(added) - next(added))


def _burst_spread(result: dict[str, Any]) -> float:
    """Largest max/min ratio of single-burst ns/pkt within one variant."""
    spread = 1.0
    keys = {r["variant"] for rnd in result["runs"] for r in rnd}
    for key in keys:
        xs = [x for rnd in result["runs"] for x in rnd if x["variant"] == key]
        vals = [v for r in xs for v in r["burst_ns_per_pkt"]]
        spread = max(spread, max(vals) / min(vals))
    return spread


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    s = result["summary"]
    tcp = result.get("tcp") or {}
    minutes = max(1, round(result["elapsed_s"] / 60))
    setup = result["setup"]
    when = time.strftime("%Y-%m-%d", time.gmtime())
    out: list[str] = []
    add = out.append
    add(
        "## Data plane: receive capacity and CPU per packet "
        "(targets: capacity >= 0.95 of no filter, accepted-path throughput >= 0.97)"
    )
    add("")
    add(
        "Command (root): `.venv/bin/python bench/bench_dataplane.py --md "
        "bench/results_dataplane.md --json bench/results_dataplane.json` (about "
        f"{minutes} minutes here; `--quick`: 3 short "
        "rounds, about a minute).  Needs kernel >= 5.18 (BPF live frames), nft, iptables "
        "with the nft backend, iperf3, ethtool.  Everything runs in `mhtB-<pid>-*` namespaces."
    )
    add("")
    add("**Method.**")
    add("")
    add(
        "* *Traffic.*  No pktgen here, and a userspace sender is too slow, so the sender is "
        "an XDP program (`bench/bpfgen.py`, raw eBPF bytecode loaded through `bpf(2)`) run by "
        "`BPF_PROG_RUN` with `BPF_F_TEST_XDP_LIVE_FRAMES`: it returns `XDP_TX` with the sender "
        "veth as `ingress_ifindex`, and the kernel transmits each frame into the peer veth's "
        "NAPI ring (GRO on, so veth runs NAPI).  Frames are 60-byte UDP datagrams to the "
        "traffic IP with its multicast MAC (01:00:5e:40:00:01), as clients send them; the "
        f"program stamps one of {cfg['flows_per_set']:,} flows per frame (source address in "
        "198.18.128.0/17, source port; IPv4 checksum precomputed, UDP checksum 0).  Accepted "
        "datagrams end in a bound UDP socket that is never read (`RcvbufErrors`)."
    )
    add(
        "* *Flows.*  For the live-set cases the flows are ones the node owns (computed with "
        "a numpy copy of the kernel jhash, checked against `multihost.flowhash`), so every "
        "packet takes the accepted path.  The non-owner cases send uniformly random flows: "
        "the node (slot 0 of 8 live, or xt_cluster node 1 of 8) owns 1/8 and drops the rest."
    )
    add(
        "* *Variants.*  (a) no filter; (a') conntrack only (one nft `ct state` rule: the "
        "multihost ruleset and xt_cluster both need conntrack); (m)/(m') one nft rule "
        "`jhash ... @owned meta pkttype set host accept` with the project's fixed-size hash "
        "set / a bitmap set (16-bit key), no conntrack -- the bare primitive; (b) the real "
        "ruleset from `render_install`, applied by `Dataplane.install` (guard + owned table) "
        f"with the owned set of slot 0 for 8 of 8 ({setup['owned_buckets']['nft8']:,} "
        f"buckets, {setup['ranges']['nft8']} range), 4 of 8 ({setup['owned_buckets']['nft4']:,}"
        f", {setup['ranges']['nft4']} ranges) and 2 of 8 live "
        f"({setup['owned_buckets']['nft2']:,}, {setup['ranges']['nft2']:,} ranges), and as a "
        "non-owner; (c) `iptables -t mangle -m cluster --cluster-total-nodes 8 "
        "--cluster-local-node 1 --cluster-hash-seed S -j MARK` + `-m mark ! --mark -j DROP` "
        "(the iptables-extensions example; xt_cluster hashes the conntrack original source "
        "address and itself rewrites `pkttype` multicast to host)."
    )
    add(
        "* *CPU per packet.*  Live frames are sent in batches of 64 with bottom halves "
        "disabled; re-enabling them runs the NET_RX softirq on the same CPU, so the "
        "receiver's whole path (veth poll, skb build, GRO, IP, netfilter, conntrack, UDP) "
        "runs synchronously in the sending thread, pinned to one CPU.  CPU = that thread's "
        "`CLOCK_THREAD_CPUTIME_ID` + the CPU time of `ksoftirqd` of that CPU "
        "(`/proc/<pid>/schedstat`), per packet that reached `ip_rcv` (`Ip.InReceives` of "
        "the receiver namespace).  This counts only CPU really spent, not time other "
        "processes took from the CPU.  The generator alone (program returns `XDP_DROP`, "
        f"{s['gen']['ns_per_pkt']['median']:.0f} ns/frame) is subtracted: *receive-side "
        "ns/pkt*; its inverse is the receive capacity of one CPU.  Cross-checks: "
        f"`ksoftirqd` took {_ksoftirqd(result):.2%} of the CPU time (so the receive path did "
        + (
            "run in the sending thread); every frame reached `ip_rcv` (no loss in any run)."
            if all(e["loss"] == 0 for e in s.values())
            else "run in the sending thread); some frames were lost before `ip_rcv` (JSON)."
        )
    )
    add(
        f"* *Interleaving.*  {cfg['rounds']} rounds; in each, every variant runs "
        f"{cfg['bursts_per_round']} bursts of "
        f"{cfg['packets_per_variant_and_round'] // cfg['bursts_per_round']:,} frames, "
        "interleaved burst by burst (gen, a, a', m, m', b..., c..., then again), after one "
        "warm-up pass over all flows.  Ratios are per round against the same round's (a), "
        "then min / median / max over the rounds."
    )
    add(
        f"* *TCP.*  iperf3, {cfg['tcp_seconds']:g} s per run, {cfg['tcp_rounds']} interleaved "
        "rounds of: no filter (unicast MAC: without the filter TCP drops multicast-MAC "
        "segments), the ruleset with the worst-case 2-of-8 set (multicast MAC; the control and "
        "data connections use client ports the node owns), xt_cluster (multicast MAC), the XDP "
        "program in generic mode (GSO super-packets, as veth carries them), and a second pair "
        "over an emulated NIC (`dp_net.Lab.wire`: two one-line XDP redirect programs hand every "
        "frame to the receiver's veth as an `xdp_frame`, one MTU segment each, as a NIC driver "
        "gets them): no filter, and the XDP program attached natively; (w) rows are ratios "
        "against the (w) no-filter row."
    )
    add("")
    add(
        f"**Results** ({when}, kernel {cfg['kernel']}, {cfg['cpus']} vCPUs shared with other "
        f"test suites; {_load(result)}):"
    )
    add("")
    add(
        "| variant | receive ns/pkt (median) | capacity, Mpps per CPU (median) | "
        "capacity vs (a): min / **median** / max | vs (a') median | reached the socket |"
    )
    add("|---|---|---|---|---|---|")
    for key in _MAIN:
        e = s[key]
        add(
            f"| {e['label']} | {e['rx_ns_per_pkt']['median']:.0f} | "
            f"{e['rx_mpps_capacity']['median']:.2f} | {_r(e['ratio_rx_capacity'])} | "
            f"{e['ratio_rx_capacity_vs_ct']['median']:.2f} | "
            f"{e['accepted_share']['median']:.3f} |"
        )
    add("")
    gen = s["gen"]["ns_per_pkt"]["median"]
    diff = max(
        abs(s[k]["ratio_e2e_pkts_per_cpu_s"]["median"] - s[k]["ratio_rx_capacity"]["median"])
        for k in _MAIN
    )
    add(
        f"Generator alone: {gen:.0f} ns/frame.  End-to-end ratios (generator included, "
        f"packets per CPU-second) differ from the receive-side ones by <= {diff:.2f}: "
        + ", ".join(
            f"{k} {s[k]['ratio_e2e_pkts_per_cpu_s']['median']:.2f}"
            for k in ("nft8", "nft4", "nft2", "xt")
        )
        + ".  Packet rate achieved in the kernel's run loop (its own clock; one CPU runs "
        "generator and receiver): "
        + ", ".join(f"{k} {s[k]['mpps_loop']['median']:.2f}" for k in ("none", "nft2", "xt"))
        + " Mpps.  (Wall-clock rates per `BPF_PROG_RUN` call are not used: with "
        "`repeat` > 1 the kernel swaps the XDP dispatcher, ~25 ms asleep per call.)"
    )
    add("")
    if tcp:
        add(
            "| TCP through an accepted flow | Gbit/s (median) "
            "| vs no filter: min / **median** / max | per CPU-second: min / **median** / max |"
        )
        add("|---|---|---|---|")
        names = {
            "none": "(a) no filter",
            "nft2": "(b) ruleset, 2 of 8 live",
            "xt": "(c) xt_cluster",
            "xdpg": "(x') XDP program (generic), owns every bucket",
            "wnone": "(w) emulated NIC: no filter (the baseline of the row below)",
            "wxdp": "(w) emulated NIC: XDP program (native), owns every bucket",
        }
        for key, e in tcp.items():
            add(
                f"| {names[key]} | {e['gbps']['median']:.1f} | {_r(e['ratio'])} "
                f"| {_r(e['ratio_per_cpu'])} |"
            )
        add("")
        share = result.get("tcp_program_share") or {}
        if share:
            add(
                "The (w) XDP program itself on that path (kernel run-time statistics, "
                f"{len(share['runs'])} runs): {share['ns_per_frame']['median']:.0f} ns a "
                f"frame at {share['frames_per_s']['median']:,.0f} frames/s, "
                f"{share['cpu_share']['median']:.2%} of the saturated CPU: a capacity of "
                f"{share['capacity_ratio']:.3f} of the same path without it "
                f"({share['capacity_ratio_net']:.3f} less what the statistics' clock reads "
                f"add, timed on the wire's one-call program: "
                f"{share['wire_ns_per_frame']['median']:.0f} ns a frame)."
            )
            add("")
        ab = result.get("tcp_toggled") or {}
        if ab.get("pooled_ci95"):
            v = result["verdicts"].get("tcp_accepted_wxdp", {})
            aa = result.get("tcp_toggled_control") or {}
            every = ab["interval_s"] * (ab["hold"] + ab["settle"])
            control = (
                f"  The A/A control (same schedule, nothing switched, {aa['seconds']} s): "
                f"{aa['pooled_ratio']:.3f} ({aa['pooled_ci95'][0]:.3f}-"
                f"{aa['pooled_ci95'][1]:.3f})."
                if aa.get("pooled_ci95")
                else ""
            )
            fl = result.get("tcp_toggled_floor") or {}
            if fl.get("pooled_ci95"):
                control += (
                    f"  The floor (an empty XDP_PASS program toggled instead, "
                    f"{fl['seconds']} s): {fl['pooled_ratio']:.3f} ({fl['pooled_ci95'][0]:.3f}-"
                    f"{fl['pooled_ci95'][1]:.3f}), the cost of the XDP hook on this path alone."
                )
            add(
                f"Toggled on one stream ({ab['seconds']} s over the (w) wire, the program "
                f"detached and re-attached every {every:g} s, the first "
                f"{ab['interval_s'] * ab['settle']:g} s after each switch not counted; a "
                f"switch took {ab['switch_ms']['median']:.0f} ms): {ab['on_gbps']:.2f} Gbit/s "
                f"with the program against {ab['off_gbps']:.2f} without, "
                f"**{ab['pooled_ratio']:.3f}** (95 % {ab['pooled_ci95'][0]:.3f}-"
                f"{ab['pooled_ci95'][1]:.3f}, {ab['on_blocks']} + {ab['off_blocks']} "
                f"stretches).{control}  TCP >= 0.98 on native XDP: "
                f"**{v.get('status', 'n/a')}**."
            )
            add("")
    add("**Verdict.**")
    add("")
    live_meds = [s[k]["ratio_rx_capacity"]["median"] for k in ("nft8", "nft4", "nft2")]
    same = max(live_meds) - min(live_meds) <= 0.03
    caps = ", ".join(
        f"{_LIVE[k]} {s[k]['ratio_rx_capacity']['median']:.2f} "
        f"(min {s[k]['ratio_rx_capacity']['min']:.2f})"
        for k in ("nft8", "nft4", "nft2")
    )
    met = all(s[k]["ratio_rx_capacity"]["median"] >= 0.95 for k in ("nft8", "nft4", "nft2"))
    add(
        f"* Receive capacity >= 0.95 of no filter in every live-set case: "
        f"**{'met' if met else 'NOT met'}** -- {caps}.  "
        + (
            "The live set does not matter (one map element per bucket: the lookup cost "
            "does not depend on fragmentation; the three medians are within 0.03), "
            if same
            else "The live-set cases differ by more than 0.03, "
        )
        + "but the ruleset as a whole costs "
        f"{s['nft2']['added_ns_per_pkt']['median']:.0f} ns/pkt more than no filter."
    )
    if tcp:
        t, c = tcp["nft2"]["ratio"], tcp["nft2"]["ratio_per_cpu"]
        v = result["verdicts"]["tcp_accepted_nft2"]
        per_skb, skbs, model = v["model_added_ns_per_skb"], v["model_skbs_per_s"], v["model_ratio"]
        word = v["status"]
        add(
            f"* Accepted-path TCP throughput >= 0.97 of no filter: "
            f"**{word}** -- median {t['median']:.3f} of the throughput "
            f"(min {t['min']:.2f}) and {c['median']:.3f} of the throughput per CPU-second "
            "(client, server and their softirqs share one pinned CPU; this second figure is "
            "not lowered by time other processes take from that CPU, but still moves with "
            "their cache interference).  TCP crosses veth as GSO "
            f"super-packets ({tcp['nft2']['gbps']['median'] * 1e9 / 8 / skbs / 1024:.0f} KiB "
            "per skb on average), so the per-packet filter cost is spread over many segments.  "
            f"Expected from the per-packet cost: {skbs:,.0f} skbs/s through the filter x "
            f"~{per_skb:.0f} ns (cache-hot pass) = {1 / model - 1:.1%} of the CPU, i.e. a "
            f"ratio of ~{model:.3f} when the CPU is the limit.  Best run vs best run: "
            f"{tcp['nft2']['best_ratio']:.2f}.  The run-to-run spread (min/max) is the "
            "shared machine plus a bimodal split of the receive work between the two "
            "processes that iperf3's CPU figures show in every variant."
        )
    share = s["nftN"]["accepted_share"]["median"]
    none_ns = s["none"]["rx_ns_per_pkt"]["median"]
    drop_ns = (
        s["nftN"]["rx_ns_per_pkt"]["median"] - share * s["nft8"]["rx_ns_per_pkt"]["median"]
    ) / (1 - share)
    add(
        f"* Non-owner (slot 0 of 8 live sees all traffic, keeps {share:.1%}, drops the rest at "
        f"priority -300, before conntrack): capacity "
        f"{s['nftN']['ratio_rx_capacity']['median']:.2f} of a node without filter that "
        f"delivers everything.  A dropped packet costs ~{drop_ns:.0f} ns (derived from the "
        f"mix and the accepted-path cost), {'more' if drop_ns > none_ns else 'less'} than the "
        f"{none_ns:.0f} ns of delivering it to a socket without filter: each one is hashed "
        "once, looked up once in the bucket map, counted and dropped; it never reaches "
        "conntrack or the later hooks."
    )
    add(
        f"* xt_cluster: {s['xt']['ratio_rx_capacity']['median']:.2f} (owned flows) and "
        f"{s['xtN']['ratio_rx_capacity']['median']:.2f} (non-owner) -- about conntrack's "
        f"own cost ((a') {s['ct']['ratio_rx_capacity']['median']:.2f}).  The multihost "
        "ruleset is "
        + (
            "slower"
            if s["nft2"]["rx_ns_per_pkt"]["median"] > s["xt"]["rx_ns_per_pkt"]["median"]
            else "faster"
        )
        + " than xt_cluster on the accepted path "
        f"({s['nft2']['rx_ns_per_pkt']['median']:.0f} vs "
        f"{s['xt']['rx_ns_per_pkt']['median']:.0f} ns/pkt)."
    )
    ct_cost = s["ct"]["added_ns_per_pkt"]["median"]
    add("")
    add(
        "**Where the time goes** (median added ns/pkt over no filter): conntrack "
        f"{ct_cost:.0f}; the bare primitive {s['min']['added_ns_per_pkt']['median']:.0f} "
        f"with the hash set, {s['minb']['added_ns_per_pkt']['median']:.0f} with a bitmap set; "
        f"the full ruleset {s['nft2']['added_ns_per_pkt']['median']:.0f}, of which "
        f"{s['nft2']['added_ns_per_pkt']['median'] - ct_cost:.0f} are nft rules beyond "
        "conntrack: three base chains (-300; the guard at -250 and the handover chain at "
        "-150 each let an accepted packet go after one compare) and, at -300, one jhash + "
        "bucket-map lookup, an l4proto set match, two `goto`s and a named counter.  Even "
        "the one-rule bitmap filter without conntrack "
        f"reaches only {s['minb']['ratio_rx_capacity']['median']:.2f}: at ~"
        f"{s['none']['rx_ns_per_pkt']['median']:.0f} ns/pkt for the whole no-filter "
        "receive path, any netfilter hook with a hash lookup is a visible fraction."
    )
    add("")
    add("**Caveats.**")
    add("")
    add(
        "* One veth pair, one CPU, 60-byte frames: this is the worst case for a per-packet "
        "cost (small packets; real NIC drivers spend more per packet, diluting the filter)."
    )
    few = result.get("few_flows") or {}
    if few:
        f = few["summary"]
        add(
            f"* Cache effects: {cfg['flows_per_set']:,} flows per set (conntrack entries, "
            "set buckets) do not fit the L2 cache.  A second pass with "
            f"{few['flows_per_set']} flows (cache-hot; same method, 3 rounds) gives added "
            "ns/pkt over no filter: conntrack "
            f"{f['ct']['added_ns_per_pkt']['median']:.0f} (vs {ct_cost:.0f}), hash-set rule "
            f"{f['min']['added_ns_per_pkt']['median']:.0f} (vs "
            f"{s['min']['added_ns_per_pkt']['median']:.0f}), bitmap rule "
            f"{f['minb']['added_ns_per_pkt']['median']:.0f} (vs "
            f"{s['minb']['added_ns_per_pkt']['median']:.0f}), ruleset 2 of 8 "
            f"{f['nft2']['added_ns_per_pkt']['median']:.0f} (vs "
            f"{s['nft2']['added_ns_per_pkt']['median']:.0f}); capacity ratios "
            f"ruleset {f['nft2']['ratio_rx_capacity']['median']:.2f}, bitmap rule "
            f"{f['minb']['ratio_rx_capacity']['median']:.2f}, hash-set rule "
            f"{f['min']['ratio_rx_capacity']['median']:.2f}.  The fixed-size hash set costs "
            f"{_gap(s):+.0f} ns/pkt against the bitmap with many flows and {_gap(f):+.0f} "
            "cache-hot."
        )
    add(
        "* The VM's 2 vCPUs were shared with concurrently running test suites.  CPU time "
        "per packet excludes time taken by other processes, but not their cache and "
        "sibling-hyperthread interference: single bursts of one variant vary by up to "
        f"{_burst_spread(result):.1f}x; the per-round ratios, measured burst-interleaved, "
        "vary much less (see min/max)."
    )
    add(
        "* The earlier hand-built figures (bitmap 1.01, one interval 0.91, 2,016 intervals "
        "0.62, xt_cluster 0.63) came from a different method and are not directly "
        "comparable: a delivered-packets/s ratio only reflects the filter's cost when the "
        "receiver, not the sender, is the bottleneck.  Here it always is: the receive path "
        "runs inside the generator's own CPU time, and the result is CPU per packet."
    )
    return "\n".join(out) + "\n"
