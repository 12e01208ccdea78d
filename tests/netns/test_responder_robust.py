"""The ARP/NDP responder under changes, stray and malformed frames, and floods (root).

Owns: replacing the addresses at runtime (both kernel filter modes), ignoring frames for
other hosts in promiscuous mode, counting malformed frames while answering on, the
in-process :class:`Responder` (bounded reads, link flap, refused configuration) and a flood
(slow).  Lab and fixtures as in ``test_responder.py`` (tests/netns/nsutil_arp.py,
conftest.py).
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from ipaddress import IPv4Address

import pytest

from multihost.dataplane import arp
from multihost.dataplane.arp import ArpPacket, Malformed
from multihost.dataplane.responder import FilterMode, Responder, build_filter
from tests.netns.nsutil_arp import (
    CLIENT_IF,
    ETH_P_ARP,
    ETH_P_IPV6,
    NODE_IF,
    OTHER,
    VIP,
    VIP2,
    VIP6,
    VIP_MAC,
    Lab,
    Start,
    arp_replies,
    arp_request,
    bpf_verdicts,
    drain,
    expect_frame,
    in_netns,
    is_reply_for,
    is_reply_to,
    nsexec,
    packet_socket,
    wait_for,
)


@pytest.mark.parametrize("mode", ["targets", "requests"])
def test_addresses_can_be_replaced_at_runtime(arp_lab: Lab, start: Start, mode: FilterMode) -> None:
    lab = arp_lab
    proc = start(lab.nodes[0], (VIP,), mode=mode)
    with (
        packet_socket(lab.client, CLIENT_IF, ETH_P_ARP) as tx,
        packet_socket(lab.client, CLIENT_IF, ETH_P_ARP) as cap,
    ):

        def ask(ip: IPv4Address) -> None:
            tx.send(arp.encode_arp(arp_request(lab, ip)))

        # Frames are handled in order, so a reply to the second request means the first one
        # has been dealt with: no sleeping needed to show it was not answered.
        ask(VIP2)
        ask(VIP)
        expect_frame(cap, is_reply_for(VIP), 3.0)
        assert proc.call("set", addresses=[str(VIP2)]) == {"ok": True}
        ask(VIP)
        ask(VIP2)
        expect_frame(cap, is_reply_for(VIP2), 3.0)
        assert [p.spa for p in arp_replies(drain(cap))] == []  # nothing else came
    c = proc.counters()
    assert c["arp_replies"] == 2
    if mode == "targets":  # the kernel filter dropped the two requests for unhosted IPs
        assert (c["frames"], c["ignored"]) == (2, 0)
    else:
        assert (c["frames"], c["ignored.not-hosted"]) == (4, 2)


def test_frames_for_other_hosts_are_ignored_in_promiscuous_mode(arp_lab: Lab, start: Start) -> None:
    lab = arp_lab
    node = lab.nodes[0]
    proc = start(node, (VIP,))
    nsexec(node, "ip", "link", "set", NODE_IF, "promisc", "on")
    try:
        with (
            packet_socket(lab.client, CLIENT_IF, ETH_P_ARP) as tx,
            packet_socket(lab.client, CLIENT_IF, ETH_P_ARP) as cap,
        ):
            elsewhere = bytes.fromhex("02aabbccddee")  # unknown to the bridge: flooded
            tx.send(arp.encode_arp(arp_request(lab, VIP, eth_dst=elsewhere)))
            tx.send(arp.encode_arp(arp_request(lab, VIP)))  # barrier
            expect_frame(cap, is_reply_for(VIP), 3.0)
            assert arp_replies(drain(cap)) == []
    finally:
        nsexec(node, "ip", "link", "set", NODE_IF, "promisc", "off")
    c = proc.counters()
    assert (c["frames"], c["arp_replies"]) == (1, 1)


@pytest.mark.parametrize("mode", ["targets", "ethertype"])
def test_malformed_frames_are_counted_and_answers_continue(
    arp_lab: Lab, start: Start, mode: FilterMode
) -> None:
    lab = arp_lab
    proc = start(lab.nodes[0], (VIP,), mode=mode)
    good = arp.encode_arp(arp_request(lab, VIP))

    def edit(offset: int, value: bytes) -> bytes:
        return good[:offset] + value + good[offset + len(value) :]

    crafted = [
        edit(14, b"\x00\x06"),  # htype
        edit(16, b"\x86\xdd"),  # ptype
        edit(18, b"\x08"),  # hlen
        edit(19, b"\x10"),  # plen
        edit(20, b"\x00\x03"),  # op: RARP
        good[:41],  # truncated
        good[:24],
        arp.encode_arp(arp_request(lab, OTHER)),  # not hosted
        arp.encode_arp(arp_request(lab, VIP, spa=VIP, sha=VIP_MAC)),  # another member
        arp.encode_arp(arp_request(lab, VIP, spa=VIP)),  # gratuitous
    ]
    rng = random.Random(1234)
    # A bridge drops frames with a multicast source MAC, and (Linux 6.x) ARP runts < ~22 bytes.
    header = arp.BROADCAST_MAC + lab.client_mac + b"\x08\x06"
    garbage = [header + rng.randbytes(rng.randrange(10, 64)) for _ in range(300)]
    garbage += [edit(rng.randrange(14, 42), bytes([rng.randrange(256)])) for _ in range(200)]
    injected = crafted + garbage

    # What the responder must count: the kernel filter's verdict, then the parser's.
    prog = build_filter([VIP], [], mode)
    expected: Counter[str] = Counter()
    for frame, ok in zip(injected, bpf_verdicts(prog, injected), strict=True):
        if not ok:
            continue
        pkt = arp.parse_frame(frame)
        if isinstance(pkt, Malformed):
            expected[f"malformed.{pkt.reason}"] += 1
        elif isinstance(pkt, ArpPacket):
            why = arp.arp_ignore_reason(pkt, {VIP}, VIP_MAC)
            expected[f"ignored.{why}" if why else "arp_replies"] += 1
    assert expected["malformed.bad-hlen"] >= 1  # the crafted one (and some random edits)
    barriers = 0
    with (
        packet_socket(lab.client, CLIENT_IF, ETH_P_ARP) as tx,
        packet_socket(lab.client, CLIENT_IF, ETH_P_ARP) as cap,
    ):
        for i in range(0, len(injected), 50):  # batches, so the socket queue never overflows
            for frame in injected[i : i + 50]:
                tx.send(frame)
            tx.send(good)  # barrier: its answer means the batch before it was handled
            barriers += 1
            expect_frame(cap, lambda f: f.startswith(lab.client_mac) and is_reply_for(VIP)(f), 5)
    assert proc.proc.poll() is None, "the responder died"
    c = proc.counters()
    assert c["kernel_drops"] == 0
    expected["arp_replies"] += barriers
    got = {k: v for k, v in c.items() if k.startswith(("malformed.", "ignored.")) and v}
    got["arp_replies"] = c["arp_replies"]
    assert got == dict(expected)
    assert c["frames"] == c["kernel_passed"] == sum(expected.values())


def test_in_process_bounded_reads_link_flap_and_validation(arp_lab: Lab) -> None:
    """The Responder object itself: bounded on_readable, errors counted, bad config refused."""
    lab = arp_lab
    node = lab.nodes[0]
    with pytest.raises(ValueError, match="multicast"):
        in_netns(node, lambda: Responder(NODE_IF, [VIP], lab.node_macs[0]))
    responder = in_netns(node, lambda: Responder(NODE_IF, [VIP], VIP_MAC))
    try:
        assert responder.own_mac == lab.node_macs[0]
        with pytest.raises(ValueError, match="traffic IP"):
            responder.set_addresses([IPv4Address("239.192.0.9")])
        assert responder.addresses == {VIP}
        assert responder.protocol == ETH_P_ARP  # IPv4 data never reaches it
        responder.set_addresses([VIP6])
        assert responder.protocol == ETH_P_IPV6
        responder.set_addresses([VIP, VIP6])
        assert responder.protocol == 0x0003  # ETH_P_ALL
        responder.set_addresses([VIP])
        with packet_socket(lab.client, CLIENT_IF, ETH_P_ARP) as tx:
            for _ in range(10):
                tx.send(arp.encode_arp(arp_request(lab, VIP)))
        wait_for(lambda: responder.counters()["kernel_passed"] == 10, 3.0, "10 queued frames")
        assert [responder.on_readable(4) for _ in range(4)] == [4, 4, 2, 0]
        assert responder.counters()["arp_replies"] == 10

        nsexec(node, "ip", "link", "set", NODE_IF, "down")
        try:
            assert responder.announce() == 0
            assert responder.on_readable() == 0
            c = responder.counters()
            assert c["send_errors.ENETDOWN"] == 2
            assert c["recv_errors.ENETDOWN"] == 1
        finally:
            nsexec(node, "ip", "link", "set", NODE_IF, "up")
        wait_for(lambda: responder.announce() == 2, 3.0, "sending again after the link is up")
    finally:
        responder.close()
        responder.close()  # idempotent


@pytest.mark.slow
def test_flood(arp_lab: Lab, start: Start, record_property: Callable[[str, object], None]) -> None:
    """Unhosted requests cost nothing (kernel filter); hosted ones are answered at full speed,
    every frame is accounted for, and the event loop stays responsive."""
    lab = arp_lab
    n = 100_000
    proc = start(lab.nodes[0], (VIP,))
    other = arp.encode_arp(arp_request(lab, OTHER))
    hosted = arp.encode_arp(arp_request(lab, VIP))
    marker_ip = IPv4Address("198.18.0.3")
    barrier = arp.encode_arp(arp_request(lab, VIP, spa=marker_ip))

    def answered_barrier(tx: socket.socket, cap: socket.socket) -> float:
        """Send the barrier until answered (it may be dropped while the queue is full)."""
        for _ in range(40):
            tx.send(barrier)
            with contextlib.suppress(AssertionError):
                expect_frame(cap, is_reply_to(marker_ip), 0.5)
                return time.monotonic()
        raise AssertionError("the responder stopped answering")

    def cpu() -> float:
        return float(proc.call("cpu")["cpu"])

    with (
        packet_socket(lab.client, CLIENT_IF, ETH_P_ARP) as tx,
        packet_socket(lab.client, CLIENT_IF, ETH_P_ARP) as cap,
    ):
        cpu_a, before, t0 = cpu(), proc.counters(), time.monotonic()
        for _ in range(n):
            tx.send(other)
        send_rate = n / (time.monotonic() - t0)
        answered_barrier(tx, cap)
        unhosted_cpu, after = cpu() - cpu_a, proc.counters()
        unhosted_seen = after["frames"] - before["frames"]  # the barrier(s) only
        assert unhosted_seen == after["arp_replies"] - before["arp_replies"] >= 1

        # Hosted flood for a fixed time: the responder is saturated, the kernel drops the excess.
        stop = threading.Event()

        def flood() -> None:
            while not stop.is_set():
                for _ in range(500):
                    tx.send(hosted)

        latencies: list[float] = []
        c0 = proc.counters()  # socket queue empty: the barrier was the last frame
        flooder = threading.Thread(target=flood)
        flooder.start()
        try:
            cpu1, c1, t1 = cpu(), proc.counters(), time.monotonic()
            while time.monotonic() - t1 < 2.0:
                t = time.monotonic()
                proc.counters()
                latencies.append(time.monotonic() - t)
            cpu2, c2, t2 = cpu(), proc.counters(), time.monotonic()
        finally:
            stop.set()
            flooder.join()
        answered_barrier(tx, cap)
        c3 = proc.counters()
    handled = c2["frames"] - c1["frames"]
    drops = c2["kernel_drops"] - c1["kernel_drops"]
    numbers = {
        "sender_frames_per_s": round(send_rate),
        "unhosted_flood_frames_reaching_user_space": unhosted_seen - 1,
        "unhosted_flood_cpu_s": round(unhosted_cpu, 3),
        "hosted_frames_per_s": round(handled / (t2 - t1)),
        "hosted_kernel_drops_per_s": round(drops / (t2 - t1)),
        "hosted_cpu_share": round((cpu2 - cpu1) / (t2 - t1), 2),
        "control_latency_max_ms": round(1000 * max(latencies, default=0), 1),
    }
    for key, value in numbers.items():
        record_property(key, value)
    print(f"\nflood numbers: {numbers}")
    assert unhosted_seen <= 2  # only the barrier(s): the kernel dropped the whole flood
    assert unhosted_cpu < 0.25, numbers
    assert handled > 1000, numbers
    # Every frame that passed the filter was handled or counted as dropped; all were answered.
    assert c3["kernel_passed"] - c0["kernel_passed"] == (
        c3["frames"] - c0["frames"] + c3["kernel_drops"] - c0["kernel_drops"]
    )
    assert c3["arp_replies"] - c0["arp_replies"] + c3["send_errors"] == c3["frames"] - c0["frames"]
    assert max(latencies, default=0) < 1.0, numbers
