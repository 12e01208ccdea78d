"""The loaded XDP program against the Python model, flow by flow (``BPF_PROG_RUN``).

Every test loads the real object (``make setup`` builds it), attaches it to a veth inside a
namespace of its own and pins it under a fresh directory of the session's BPF filesystem;
the fixtures (``netns``, ``pin_dir`` in conftest.py) detach and unpin whatever happens.

Owns: the verdicts: every flow's bucket and verdict in each hash mode (also with large
tables), ICMP errors, fragments, traffic IPs sharing a fast-path slot, and the return
groups (replies hashed into their request's bucket).  The program's state over time (lease,
handover memory, restart, table flips) is in ``test_xdp_state.py``.
"""

from __future__ import annotations

import ipaddress
import os
import random
from pathlib import Path

import pytest

from multihost.dataplane.ruleset import GroupBuckets, GroupSpec, ReturnSpec, RulesetSpec
from multihost.dataplane.xdp import XdpDataplane
from multihost.dataplane.xdplayout import BucketState
from multihost.flowhash import RETURN_MODES, Flow, HashMode, flow_bucket
from tests.netns import xdpframes as xf
from tests.netns.nsutil import ns_run
from tests.netns.xdpspec import BUCKETS, VIP4, VIP6, web_spec

FLOWS_PER_MODE = 10_000


def _random_state(
    rng: random.Random, buckets: int = BUCKETS
) -> tuple[GroupBuckets, dict[int, BucketState]]:
    states = [rng.choice(list(BucketState)) for _ in range(buckets)]
    sets: dict[str, set[int]] = {"owned": set(), "draining": set(), "incoming": set()}
    names = {
        BucketState.OWNED: "owned",
        BucketState.DRAINING: "draining",
        BucketState.INCOMING: "incoming",
    }
    for b, s in enumerate(states):
        if s in names:
            sets[names[s]].add(b)
    gb = GroupBuckets(**{k: frozenset(v) for k, v in sets.items()})
    return gb, dict(enumerate(states))


def _random_flow(rng: random.Random) -> Flow:
    proto = rng.choice(["tcp", "udp", "tcp", "udp", "icmp", "sctp"])
    if rng.random() < 0.3:
        src: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv6Address(
            (0x20010DB8 << 96) | rng.getrandbits(64)
        )
        dst: ipaddress.IPv4Address | ipaddress.IPv6Address = VIP6
        proto = "icmpv6" if proto == "icmp" else proto
    else:
        src = ipaddress.IPv4Address((198 << 24) | (18 << 16) | (1 << 15) | rng.getrandbits(15))
        dst = VIP4
    return Flow(
        src, rng.randrange(1, 65536), dst, rng.choice([80, 443, rng.randrange(1, 65536)]), proto
    )


def _mac(ns: str) -> bytes:
    out = ns_run(ns, "cat", "/sys/class/net/x0/address").stdout.strip()
    return bytes.fromhex(out.replace(":", ""))


@pytest.mark.parametrize("buckets", [27_720, 720_720])
def test_large_tables_per_group_match_the_model(netns: str, pin_dir: Path, buckets: int) -> None:
    """The min-wise tables of 12 and 16 slots (lcm(1..n) buckets): two groups, so the
    second group's table lives past the first's two halves, and buckets above 65,535."""
    rng = random.Random(f"xdp-big-{buckets}")
    seed = rng.getrandbits(32)
    other = ipaddress.ip_address("198.18.0.101")
    spec = RulesetSpec(
        buckets,
        seed,
        (GroupSpec("api", (other,)), GroupSpec("web", (VIP4, VIP6), HashMode.FOUR_TUPLE)),
    )
    gb_api, _ = _random_state(rng, buckets)
    gb_first, _ = _random_state(rng, buckets)
    gb, states = _random_state(rng, buckets)
    dp = XdpDataplane(spec, "x0", pin_dir, netns=netns)
    os.sched_setaffinity(0, {0})
    try:
        dp.install({"api": gb_api, "web": gb_first})
        dp.update({"api": gb_api, "web": gb})  # into the other half of the double buffer
        high = 0
        mismatches: list[str] = []
        for _ in range(3000):
            flow = _random_flow(rng)
            retval, _, _ = dp.test_run(xf.frame(flow, flags=xf.SYN))
            want_bucket = flow_bucket(flow, buckets, seed, HashMode.FOUR_TUPLE)
            high += want_bucket > 0xFFFF
            bucket, state = dp.last_hashed(1, 0)
            want = xf.expected(flow, states[want_bucket], flags=xf.SYN)
            want_ret = xf.XDP_PASS if xf.passes(want) else xf.XDP_DROP
            if (bucket, retval, state) != (want_bucket, want_ret, states[want_bucket]):
                mismatches.append(f"{flow}: bucket {bucket}/{want_bucket}, ret {retval}/{want_ret}")
        assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[:3]}"
        assert high > 0 or buckets <= 0xFFFF
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        dp.remove()
    assert not pin_dir.exists()


@pytest.mark.parametrize("mode", list(HashMode))
def test_every_flow_gets_the_models_bucket_and_verdict(
    netns: str, pin_dir: Path, mode: HashMode
) -> None:
    rng = random.Random(f"xdp-{mode.value}")
    seed = rng.getrandbits(32)
    gb, states = _random_state(rng)
    dp = XdpDataplane(web_spec(mode, seed), "x0", pin_dir, netns=netns)
    os.sched_setaffinity(0, {0})  # BPF_PROG_RUN runs on this CPU: read its per-CPU stats
    try:
        dp.install({"web": gb})
        mac = _mac(netns)
        mismatches: list[str] = []
        for _ in range(FLOWS_PER_MODE):
            flow = _random_flow(rng)
            flags = rng.choice([xf.SYN, xf.ACK, xf.SYN | xf.ACK])
            retval, out, _ = dp.test_run(xf.frame(flow, flags=flags))
            want_bucket = flow_bucket(flow, BUCKETS, seed, mode)
            bucket, state = dp.last_hashed(0, 0)
            want = xf.expected(flow, states[want_bucket], flags=flags)
            want_ret = xf.XDP_PASS if xf.passes(want) else xf.XDP_DROP
            if (bucket, retval) != (want_bucket, want_ret) or state != states[want_bucket]:
                mismatches.append(
                    f"{flow}: bucket {bucket} want {want_bucket}, ret {retval} want {want_ret}"
                )
            elif retval == xf.XDP_PASS and out[:6] != mac:
                mismatches.append(f"{flow}: passed without the interface MAC ({out[:6].hex()})")
        assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[:3]}"
        c = dp.counters()["web"]
        assert c["accepted_packets"] + c["dropped_packets"] == FLOWS_PER_MODE
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        dp.remove()
    assert not pin_dir.exists()


def test_icmp_errors_reach_every_node_and_other_traffic_is_untouched(
    netns: str, pin_dir: Path
) -> None:
    dp = XdpDataplane(web_spec(HashMode.FOUR_TUPLE, 7), "x0", pin_dir, netns=netns)
    try:
        dp.install({})  # owns nothing
        f4 = Flow(xf.addr("198.18.1.1"), 0, VIP4, 0, "icmp")
        for t, ret in ((3, xf.XDP_PASS), (11, xf.XDP_PASS), (8, xf.XDP_DROP)):
            assert dp.test_run(xf.frame(f4, icmp_type=t))[0] == ret, t
        f6 = Flow(xf.addr("2001:db8::1"), 0, VIP6, 0, "icmpv6")
        for t, ret in ((2, xf.XDP_PASS), (135, xf.XDP_PASS), (128, xf.XDP_DROP)):
            assert dp.test_run(xf.frame(f6, icmp_type=t))[0] == ret, t
        other = Flow(xf.addr("198.18.1.1"), 1, xf.addr("198.18.0.7"), 80, "tcp")
        retval, out, _ = dp.test_run(xf.frame(other))
        assert retval == xf.XDP_PASS and out[:6] == xf.VIP_MAC  # not a traffic IP: as it was
        assert dp.counters()["web"]["xdp_to_all_packets"] == 4
    finally:
        dp.remove()


@pytest.mark.parametrize("family", [4, 6])
def test_fragments_follow_their_first_fragment(netns: str, pin_dir: Path, family: int) -> None:
    spec = web_spec(HashMode.FOUR_TUPLE, 11)
    dp = XdpDataplane(spec, "x0", pin_dir, netns=netns)
    vip, src = (VIP4, "198.18.2.") if family == 4 else (VIP6, "2001:db8::2:")
    flows = [Flow(xf.addr(f"{src}{i}"), 5000 + i, vip, 53, "udp") for i in range(1, 60)]
    mine = frozenset(flow_bucket(f, BUCKETS, 11) for f in flows[::2])
    try:
        dp.install({"web": GroupBuckets(owned=mine)})
        for i, f in enumerate(flows):
            owner = flow_bucket(f, BUCKETS, 11) in mine
            body = xf.l4(f, payload=b"y" * 1472)
            first = dp.test_run(xf.frame(f, frag=(0, True, 1000 + i), body=body[:1480]))[0]
            later = dp.test_run(xf.frame(f, frag=(1480, False, 1000 + i), body=b"z" * 200))[0]
            want = xf.XDP_PASS if owner else xf.XDP_DROP
            assert (first, later) == (want, want), (f, first, later)
        stray = Flow(xf.addr(f"{src}200"), 1, vip, 53, "udp")
        assert (
            dp.test_run(xf.frame(stray, frag=(1480, False, 77), body=b"z" * 20))[0] == xf.XDP_DROP
        )
        c = dp.counters()["web"]
        assert c["xdp_frag_passed_packets"] + c["xdp_frag_dropped_packets"] == len(flows) + 1
    finally:
        dp.remove()


def test_traffic_ips_sharing_a_fast_path_slot(netns: str, pin_dir: Path) -> None:
    """Two IPv4 traffic IPs in one mh_vip4 slot go through the hash map; an address that is
    not a traffic IP but lands in a used slot passes untouched."""
    from multihost.dataplane.xdplayout import vip4_slot

    base = ipaddress.IPv4Address("198.18.0.100")
    first = vip4_slot(base.packed)
    other = next(
        a
        for i in range(1, 1 << 16)
        if vip4_slot((a := ipaddress.IPv4Address(int(base) + i)).packed) == first
    )
    lone = next(
        a
        for i in range(1, 1 << 16)
        if vip4_slot((a := ipaddress.IPv4Address(int(base) - i)).packed) == first
    )
    spec = RulesetSpec(BUCKETS, 2, (GroupSpec("web", (base,)), GroupSpec("api", (other,))))
    dp = XdpDataplane(spec, "x0", pin_dir, netns=netns)
    try:
        dp.install({"web": GroupBuckets(owned=frozenset(range(BUCKETS)))})
        src = xf.addr("198.18.9.9")
        assert dp.test_run(xf.frame(Flow(src, 1, base, 80, "tcp")))[0] == xf.XDP_PASS
        assert dp.test_run(xf.frame(Flow(src, 1, other, 80, "tcp")))[0] == xf.XDP_DROP  # api
        retval, out, _ = dp.test_run(xf.frame(Flow(src, 1, lone, 80, "tcp")))
        assert retval == xf.XDP_PASS and out[:6] == xf.VIP_MAC  # not a traffic IP
        assert dp.counters()["api"]["dropped_packets"] == 1
    finally:
        dp.remove()


# ------------------------------------------------------------------ return groups
GW4 = ipaddress.ip_address("198.19.0.1")
GW6 = ipaddress.ip_address("2001:db8:1::1")
MAC6 = bytes.fromhex("333300000001")


def _return_spec(front: HashMode, seed: int, interface: str = "x1") -> RulesetSpec:
    ret = ReturnSpec(
        "web_ret",
        "web",
        (GW4, GW6),
        interface,
        RETURN_MODES[front],
        ((4, "01:00:5e:40:00:01"), (6, "33:33:00:00:00:01")),
    )
    return RulesetSpec(BUCKETS, seed, (GroupSpec("web", (VIP4, VIP6), front),), returns=(ret,))


def _reply_frame(reply: Flow, flags: int) -> bytes:
    out = xf.frame(reply, flags=flags)
    return (MAC6 if reply.daddr.version == 6 else xf.VIP_MAC) + out[6:]


@pytest.mark.parametrize("front", list(RETURN_MODES))
def test_replies_get_the_request_bucket_and_verdict(
    netns: str, pin_dir: Path, front: HashMode
) -> None:
    """Random requests client -> traffic IP, each answered by a back end from a random
    address and port to the client: on the return interface, the reply is hashed with the
    return mode, lands in the request's bucket (of the front group's table) and gets the
    same verdict; passed, it carries that interface's own MAC."""
    rng = random.Random(f"xdp-return-{front.value}")
    seed = rng.getrandbits(32)
    gb, states = _random_state(rng)
    dp = XdpDataplane(_return_spec(front, seed), "x0", pin_dir, netns=netns)
    os.sched_setaffinity(0, {0})
    try:
        dp.install({"web": gb})
        assert dp.describe()["return_interfaces"] == ["x1"]
        out = ns_run(netns, "ip", "-j", "link", "show", "x1").stdout
        assert '"xdp"' in out  # the program runs on the return interface too
        mac1 = bytes.fromhex(
            ns_run(netns, "cat", "/sys/class/net/x1/address").stdout.strip().replace(":", "")
        )
        mismatches: list[str] = []
        for _ in range(FLOWS_PER_MODE):
            request = _random_flow(rng)
            v6 = request.saddr.version == 6
            backend = xf.addr(f"2001:db8:1::{rng.randrange(2, 9999):x}" if v6 else "198.19.0.9")
            bport = rng.choice([80, 8080, rng.randrange(1, 65536)])
            reply = Flow(backend, bport, request.saddr, request.sport, request.proto)
            if request.proto in ("icmp", "icmpv6"):
                reply = Flow(backend, 0, request.saddr, 0, request.proto)
            flags = rng.choice([xf.SYN | xf.ACK, xf.ACK, xf.SYN])
            want_bucket = flow_bucket(request, BUCKETS, seed, front)
            assert flow_bucket(reply, BUCKETS, seed, RETURN_MODES[front]) == want_bucket
            retval, frame_out, _ = dp.test_run(_reply_frame(reply, flags), interface="x1")
            bucket, state = dp.last_hashed(1, 0)  # the return group's counters
            want = xf.expected(reply, states[want_bucket], flags=flags)
            want_ret = xf.XDP_PASS if xf.passes(want) else xf.XDP_DROP
            if (bucket, state, retval) != (want_bucket, states[want_bucket], want_ret):
                mismatches.append(
                    f"{reply}: bucket {bucket} want {want_bucket}, ret {retval} want {want_ret}"
                )
            elif retval == xf.XDP_PASS and frame_out[:6] != mac1:
                mismatches.append(f"{reply}: passed without x1's MAC ({frame_out[:6].hex()})")
        assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[:3]}"
        c = dp.counters()
        assert c["web_ret"]["accepted_packets"] + c["web_ret"]["dropped_packets"] == FLOWS_PER_MODE
        assert c["web"]["accepted_packets"] + c["web"]["dropped_packets"] == 0
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        dp.remove()
    assert not pin_dir.exists()
    assert '"xdp"' not in ns_run(netns, "ip", "-j", "link", "show", "x1").stdout


def test_what_is_not_a_reply_passes_untouched(netns: str, pin_dir: Path) -> None:
    dp = XdpDataplane(_return_spec(HashMode.SOURCE_IP_PORT, 5), "x0", pin_dir, netns=netns)
    try:
        dp.install({})  # owns nothing: every reply would be dropped
        client, backend = xf.addr("198.18.7.7"), xf.addr("198.19.0.9")
        reply = Flow(backend, 80, client, 40000, "tcp")
        frame = _reply_frame(reply, xf.SYN | xf.ACK)
        assert dp.test_run(frame, interface="x1")[0] == xf.XDP_DROP  # a reply, not ours
        for what, f, iface in (
            ("arrived on an interface without a return group", frame, "x0"),
            ("to a unicast MAC", xf.CLIENT_MAC + frame[6:], "x1"),
            ("to the IPv6 cluster MAC", MAC6 + frame[6:], "x1"),
            (
                "to a multicast IP (a heartbeat)",
                xf.frame(Flow(backend, 7946, xf.addr("239.192.0.1"), 7946, "udp")),
                "x1",
            ),
        ):
            retval, out, _ = dp.test_run(f, interface=iface)
            assert (retval, out[:6]) == (xf.XDP_PASS, f[:6]), what
        # to the gateway address itself: the return group decides (not ours: dropped)
        to_gw = xf.frame(Flow(backend, 5000, GW4, 80, "tcp"))
        assert dp.test_run(to_gw, interface="x1")[0] == xf.XDP_DROP
        # ICMP errors to a client go to every node (PMTU discovery for the owner)
        err = xf.frame(Flow(backend, 0, client, 0, "icmp"), icmp_type=3)
        assert dp.test_run(err, interface="x1")[0] == xf.XDP_PASS
        c = dp.counters()["web_ret"]
        assert c["xdp_to_all_packets"] == 1 and c["dropped_packets"] == 2
        dp.update({"web": GroupBuckets(owned=frozenset(range(BUCKETS)))})
        assert dp.test_run(frame, interface="x1")[0] == xf.XDP_PASS  # one flip: both ways
        x1 = bytes.fromhex(
            ns_run(netns, "cat", "/sys/class/net/x1/address").stdout.strip().replace(":", "")
        )
        retval, out, _ = dp.test_run(to_gw, interface="x1")  # to the gateway: as it came in
        assert (retval, out[:6]) == (xf.XDP_PASS, x1)
    finally:
        dp.remove()


def test_return_interface_cleanup(netns: str, pin_dir: Path) -> None:
    """A killed agent's program on the return interface is detached by ``cleanup``."""
    from multihost.dataplane.xdpattach import cleanup

    dp = XdpDataplane(_return_spec(HashMode.SOURCE_IP, 5), "x0", pin_dir, netns=netns)
    dp.install({})
    dp.close()  # killed: stays attached and pinned
    again = XdpDataplane(_return_spec(HashMode.SOURCE_IP, 5), "x0", pin_dir, netns=netns)
    again.install({})  # adopts, finds itself on x1 too
    assert again.extra_attached["x1"].adopted
    again.close()
    done = cleanup("x0", pin_dir, netns, extra_interfaces=("x1",))
    assert done["detached"] and done["return_interfaces"]["x1"]
    for iface in ("x0", "x1"):
        assert '"xdp"' not in ns_run(netns, "ip", "-j", "link", "show", iface).stdout
