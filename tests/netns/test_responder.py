"""The ARP/NDP responder in real network namespaces, as the client sees it (root).

Lab (tests/netns/nsutil_arp.py; fixtures ``arp_lab``, ``fresh_lab``, ``start`` and
``responders`` in conftest.py): a bridge in a "switch" netns, a client netns and two node
netns, each node with the traffic IPs on ``lo`` and ``arp_ignore=1``/``arp_announce=2``; the
responder runs as a subprocess under asyncio in each node netns.  The kernel itself never
answers for the traffic IPs, so every answer the client sees comes from the responder.

Owns: what the client gets: replies (ARP and ND) with the cluster's multicast MAC from every
node, its neighbour entries, datagrams reaching every node, refresh probes and
announcements.  The responder's filtering, malformed input and load are in
``test_responder_robust.py``.
"""

from __future__ import annotations

import os
import socket
import time
from ipaddress import IPv6Address

import pytest

from multihost.dataplane import arp
from multihost.dataplane.arp import ArpPacket
from multihost.macaddr import format_mac
from tests.netns.nsutil_arp import (
    CLIENT_IF,
    CLIENT_IP,
    ETH_P_ARP,
    ETH_P_IP,
    ETH_P_IPV6,
    NODE_IF,
    VIP,
    VIP6,
    VIP_MAC,
    VIP_MAC6,
    Lab,
    ResponderProcess,
    Start,
    arp_replies,
    arp_request,
    drain,
    expect_frame,
    is_na,
    is_reply_for,
    nsexec,
    packet_socket,
    reachable,
    udp_socket,
    wait_for,
)


def test_kernel_alone_does_not_answer_for_traffic_ips(fresh_lab: Lab) -> None:
    lab = fresh_lab
    with (
        packet_socket(lab.client, CLIENT_IF) as tx,
        packet_socket(lab.client, CLIENT_IF) as client_cap,
        packet_socket(lab.nodes[0], NODE_IF) as node_cap,
    ):
        ns = arp.build_neighbor_solicitation(IPv6Address("fd00:198:18::1"), VIP6, lab.client_mac)
        tx.send(arp.encode_arp(arp_request(lab, VIP)))
        tx.send(ns)
        # Both reached the node's interface (so silence below is the kernel's choice) ...
        expect_frame(node_cap, lambda f: f == ns, 2.0)
        # ... and a kernel answers within microseconds: half a second of silence is enough.
        with pytest.raises(AssertionError, match="no matching frame"):
            expect_frame(client_cap, lambda f: is_reply_for(VIP)(f) or is_na(f), 0.5)


def test_arping_is_answered_by_every_node_with_the_multicast_mac(
    fresh_lab: Lab, responders: list[ResponderProcess]
) -> None:
    lab = fresh_lab
    with packet_socket(lab.client, CLIENT_IF, ETH_P_ARP) as cap:
        run = nsexec(lab.client, "arping", "-c", "3", "-W", "0.2", "-i", CLIENT_IF, str(VIP),
                     check=False)  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr
        # Debian's (Habets) arping prints the Ethernet source: each node's unicast MAC.
        assert "3 packets transmitted, 6 packets received" in run.stdout, run.stdout
        replies = arp_replies(drain(cap), VIP)
    assert len(replies) == 6
    assert {p.sha for p in replies} == {VIP_MAC}  # what the client learns
    assert sorted(p.eth_src for p in replies) == sorted(lab.node_macs * 3)  # unicast sources
    assert {(p.eth_dst, p.tha, p.tpa) for p in replies} == {
        (lab.client_mac, lab.client_mac, CLIENT_IP)
    }
    for proc in responders:
        c = proc.counters()
        assert (c["arp_requests"], c["arp_replies"], c["malformed"], c["send_errors"]) == (
            3,
            3,
            0,
            0,
        )


def test_client_neighbour_entry_is_the_multicast_mac(
    fresh_lab: Lab, responders: list[ResponderProcess]
) -> None:
    lab = fresh_lab
    with packet_socket(lab.client, CLIENT_IF, ETH_P_ARP) as cap, udp_socket(lab.client) as udp:
        udp.sendto(b"resolve me", (str(VIP), 9))
        entry = wait_for(reachable(lab, VIP), 5.0, "a REACHABLE neighbour entry for the VIP")
        replies = arp_replies(drain(cap), VIP)
    assert entry["lladdr"] == format_mac(VIP_MAC) == "01:00:5e:40:00:01"
    assert replies, "the client saw no ARP reply"
    assert {p.sha for p in replies} == {VIP_MAC}
    assert not {p.sha for p in replies} & set(lab.node_macs)


def test_client_datagrams_reach_every_node(
    fresh_lab: Lab, responders: list[ResponderProcess]
) -> None:
    lab = fresh_lab
    marker = os.urandom(8)
    taps = [packet_socket(ns, NODE_IF, ETH_P_IP) for ns in lab.nodes]
    try:
        with udp_socket(lab.client) as udp:
            udp.sendto(marker, (str(VIP), 9999))
        for tap in taps:
            frame = expect_frame(tap, lambda f: f.endswith(marker), 5.0)
            assert frame[:6] == VIP_MAC  # Ethernet destination: the cluster MAC
            assert frame[30:34] == VIP.packed  # IPv4 destination: the VIP
    finally:
        for tap in taps:
            tap.close()


def test_unicast_refresh_probe_to_the_multicast_mac_is_answered(
    fresh_lab: Lab, responders: list[ResponderProcess]
) -> None:
    """A STALE entry is re-confirmed by unicast ARP sent *to the multicast MAC* (RFC 1122)."""
    lab = fresh_lab
    knob = f"net.ipv4.neigh.{CLIENT_IF}.delay_first_probe_time"
    old = nsexec(lab.client, "sysctl", "-n", knob).stdout.strip()
    nsexec(lab.client, "sysctl", "-qw", f"{knob}=1")
    tap = packet_socket(lab.nodes[0], NODE_IF, ETH_P_ARP)
    try:
        with udp_socket(lab.client) as udp:
            udp.sendto(b"x", (str(VIP), 9))
            wait_for(reachable(lab, VIP), 5.0, "first resolution")
            nsexec(lab.client, "ip", "neigh", "change", str(VIP), "lladdr", format_mac(VIP_MAC),
                   "dev", CLIENT_IF, "nud", "stale")  # fmt: skip
            drain(tap)
            udp.sendto(b"x", (str(VIP), 9))  # STALE -> DELAY -> PROBE (unicast)
            probe = expect_frame(tap, lambda f: f[:6] == VIP_MAC and f[12:14] == b"\x08\x06", 8)
            entry = wait_for(reachable(lab, VIP), 8.0, "re-confirmation by the unicast probe")
    finally:
        tap.close()
        nsexec(lab.client, "sysctl", "-qw", f"{knob}={old}")
    pkt = arp.parse_arp(probe)
    assert isinstance(pkt, ArpPacket)
    assert (pkt.op, pkt.tpa, pkt.eth_dst) == (arp.ARP_REQUEST, VIP, VIP_MAC)
    assert entry["lladdr"] == format_mac(VIP_MAC)


def test_announce_sends_gratuitous_arp_and_unsolicited_na(fresh_lab: Lab, start: Start) -> None:
    lab = fresh_lab
    proc = start(lab.nodes[0], (VIP, VIP6))
    node_mac = lab.node_macs[0]
    nsexec(lab.client, "ip", "neigh", "replace", str(VIP), "lladdr", "02:00:00:00:00:99",
           "dev", CLIENT_IF, "nud", "stale")  # fmt: skip
    with packet_socket(lab.client, CLIENT_IF) as cap:
        assert proc.call("announce") == {"sent": 3}
        want = [
            arp.build_gratuitous_arp(VIP, VIP_MAC, node_mac, arp.ARP_REQUEST),
            arp.build_gratuitous_arp(VIP, VIP_MAC, node_mac, arp.ARP_REPLY),
            arp.build_unsolicited_na(VIP6, VIP_MAC6, node_mac),
        ]

        def announcement(f: bytes) -> bool:
            return f[6:12] == node_mac and (f[12:14] == b"\x08\x06" or is_na(f))

        got = [expect_frame(cap, announcement, 2.0) for _ in want]
    assert got == want
    # The client took the announcement over its (stale, wrong) entry.
    wait_for(
        lambda: (lab.client_neighbour(VIP) or {}).get("lladdr") == format_mac(VIP_MAC),
        2.0,
        "the gratuitous ARP to update the client's entry",
    )
    assert proc.counters()["announcements"] == 3


def test_ipv6_neighbour_entry_is_the_multicast_mac(
    fresh_lab: Lab, responders: list[ResponderProcess]
) -> None:
    lab = fresh_lab
    with (
        packet_socket(lab.client, CLIENT_IF, ETH_P_IPV6) as cap,
        udp_socket(lab.client, socket.AF_INET6) as udp,
    ):
        udp.sendto(b"resolve me", (str(VIP6), 9))
        entry = wait_for(reachable(lab, VIP6), 5.0, "a REACHABLE neighbour entry for VIP6")
        # Both nodes answer; under load the second advertisement can trail the entry.
        adverts: list[arp.NeighborAdvertisement] = []
        deadline = time.monotonic() + 5.0
        while True:
            parsed = [arp.parse_neighbor_advertisement(f) for f in drain(cap)]
            adverts += [a for a in parsed if isinstance(a, arp.NeighborAdvertisement)]
            if {a.eth_src for a in adverts} >= set(lab.node_macs):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
    assert entry["lladdr"] == format_mac(VIP_MAC6) == "33:33:ef:c0:00:01"
    assert {a.eth_src for a in adverts} == set(lab.node_macs)  # both answered, from unicast
    for a in adverts:
        assert (a.target, a.target_lladdr, a.eth_dst) == (VIP6, VIP_MAC6, lab.client_mac)
        assert a.flags == arp.NA_FLAG_SOLICITED | arp.NA_FLAG_OVERRIDE
    for proc in responders:
        c = proc.counters()
        assert c["nd_advertisements"] >= 1
        assert c["malformed"] == c["send_errors"] == 0
