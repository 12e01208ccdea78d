"""Pure checks of the lab description (and of the probe's pure helpers): no root needed."""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
from fractions import Fraction

import pytest

from multihost.assignment import assign, default_table, slots_of
from multihost.flowhash import Flow, flow_bucket
from multihost.lab import addressing, naming, probe, probe_worker, udpecho
from multihost.lab.addressing import GROUP_RANGE, LAB_RANGE
from multihost.lab.naming import TopologyError, netns_pattern
from multihost.lab.state import LabError
from multihost.lab.topology import SwitchMode, Topology, describe
from multihost.macaddr import is_multicast_mac, parse_mac

ALL_SIZES = [(n, c) for n in range(1, 17) for c in range(1, 9)]


@pytest.mark.parametrize(("nodes", "clients"), ALL_SIZES)
def test_addresses_names_and_macs_obey_the_hard_rules(nodes: int, clients: int) -> None:
    topo = describe(nodes, clients, prefix="mhtU-", seed=7)
    assert len(topo.nodes) == nodes and len(topo.clients) == clients
    addresses = [a for h in topo.hosts for a in h.addresses] + [topo.vip]
    assert all(ipaddress.IPv4Address(a) in LAB_RANGE for a in addresses)
    assert len(set(addresses)) == len(addresses)
    assert ipaddress.IPv4Address(topo.group) in GROUP_RANGE
    names = topo.netns_names()
    assert len(set(names)) == len(names) == 1 + nodes + clients
    assert all(n.startswith("mhtU-") and netns_pattern("mhtU-").match(n) for n in names)
    macs = [parse_mac(h.mac) for h in topo.hosts]
    assert len(set(macs)) == len(macs)
    assert not any(is_multicast_mac(m) or not m[0] & 0x02 for m in macs)  # local unicast
    assert topo.members == tuple("ABCDEFGHIJKLMNOP"[:nodes])
    assert all(len(c.addresses) == 1 + addressing.EXTRA_SOURCES for c in topo.clients)


def test_buckets_match_the_model_and_the_group_mac_matches_the_group() -> None:
    topo = describe(4, prefix="mhtU-")
    assert topo.buckets == default_table().buckets == 40320
    assert topo.group_mac == "01:00:5e:40:00:01"
    assert topo.port == 80


@pytest.mark.parametrize(("nodes", "buckets"), [(8, 40320), (9, 2520), (12, 27720), (16, 720720)])
def test_buckets_follow_the_cluster_table(nodes: int, buckets: int) -> None:
    topo = describe(nodes, prefix="mhtU-")
    assert topo.buckets == topo.table.buckets == buckets
    assert Topology.from_dict(topo.to_dict()) == topo


def test_weighted_lab_records_weights_and_its_table() -> None:
    topo = describe(3, prefix="mhtU-", weights={"A": 2})
    assert topo.weights == (2, 1, 1) and topo.summary()["weights"] == {"A": 2, "B": 1, "C": 1}
    assert Topology.from_dict(topo.to_dict()) == topo
    assert topo.table.owners(frozenset({0, 1, 2})).tolist().count(0) == 40320 // 2
    assert describe(3, prefix="mhtU-", weights={"A": 1}).weights == ()  # all 1: unweighted


def test_seed_is_random_unless_given() -> None:
    seeds = {describe(2, prefix="mhtU-").seed for _ in range(8)}
    assert len(seeds) > 1
    assert all(0 <= s <= 0xFFFFFFFF for s in seeds)
    assert describe(2, prefix="mhtU-", seed=0x5EED1234).seed_text == "0x5eed1234"


def test_summary_is_the_lab_up_json_shape() -> None:
    topo = describe(3, 2, prefix="mhtU-", seed=0xABC)
    out = json.loads(json.dumps(topo.summary()))
    assert out["vip"] == "198.18.0.100"
    assert out["port"] == 80
    assert out["client_netns"] == "mhtU-c1"
    assert out["members"] == ["A", "B", "C"]
    assert out["seed"] == "0x00000abc"
    assert out["buckets"] == 40320
    assert out["nodes"]["B"]["netns"] == "mhtU-B"
    assert out["nodes"]["B"]["address"] == "198.18.0.12"
    assert set(out["nodes"]) == {"A", "B", "C"}


def test_to_dict_round_trips_through_json() -> None:
    topo = describe(5, 3, prefix="mhtU-", switch_mode=SwitchMode.STRICT)
    again = Topology.from_dict(json.loads(json.dumps(topo.to_dict())))
    assert again == topo


def test_from_dict_rejects_a_record_that_breaks_the_rules() -> None:
    d = describe(2, prefix="mhtU-").to_dict()
    d["nodes"][0]["address"] = "10.0.0.1"
    with pytest.raises(TopologyError, match="outside"):
        Topology.from_dict(d)
    d = describe(2, prefix="mhtU-").to_dict()
    d["nodes"][1]["netns"] = "mhtA-scratch"
    with pytest.raises(TopologyError, match="naming scheme"):
        Topology.from_dict(d)
    with pytest.raises(TopologyError, match="malformed"):
        Topology.from_dict({"prefix": "mhtU-"})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nodes": 0}, "nodes"),
        ({"nodes": 17}, "nodes"),
        ({"nodes": 3, "weights": {"A": 0}}, "weights"),
        ({"nodes": 3, "weights": {"A": 15}}, "weights add up to 17"),
        ({"nodes": 3, "weights": {"Z": 2}}, "no node 'Z'"),
        ({"nodes": 2, "clients": 0}, "clients"),
        ({"nodes": 2, "prefix": "mh"}, "prefix"),
        ({"nodes": 2, "prefix": "m/h-"}, "prefix"),
        ({"nodes": 2, "prefix": "mh-x-"}, "prefix"),
        ({"nodes": 2, "group": "239.191.0.1"}, "group"),
        ({"nodes": 2, "vip": "10.0.0.1"}, "traffic IP"),
        ({"nodes": 2, "seed": 1 << 32}, "seed"),
    ],
)
def test_describe_rejects_bad_input(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(TopologyError, match=message):
        describe(**kwargs)  # type: ignore[arg-type]


def test_prefix_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(naming.PREFIX_ENV, raising=False)
    assert describe(1).prefix == "mh-"
    monkeypatch.setenv(naming.PREFIX_ENV, "mhtZ9-")
    assert describe(1).netns_names()[0] == "mhtZ9-sw"
    assert str(naming.state_dir("mhtZ9-")) == "/run/multihost-lab/mhtZ9-"


def test_netns_pattern_is_prefix_exact() -> None:
    pat = netns_pattern("mhtA-")
    assert pat.match("mhtA-sw") and pat.match("mhtA-H") and pat.match("mhtA-c8")
    assert pat.match("mhtA-P")
    for other in ("mhtA-scratch", "mhtA-AB", "mhtA-c9", "mhtA-", "xmhtA-A", "mhtA-A ", "mhtAB-A",
                  "mhtA-Q"):  # fmt: skip
        assert not pat.match(other), other
    assert not netns_pattern("mh-").match("mhtA-A")


def test_switch_modes_configure_the_bridge() -> None:
    modes = {m: describe(2, prefix="mhtU-", switch_mode=m).switch for m in SwitchMode}
    assert all(s.mcast_snooping for s in modes.values())
    assert (
        modes[SwitchMode.SNOOPING].mcast_querier and modes[SwitchMode.SNOOPING].node_ports_mrouter
    )
    assert not modes[SwitchMode.FLOOD].mcast_querier
    assert modes[SwitchMode.STRICT].mcast_querier
    assert not modes[SwitchMode.STRICT].node_ports_mrouter


def test_host_lookup() -> None:
    topo = describe(2, 2, prefix="mhtU-")
    assert topo.host("client") is topo.clients[0]
    assert topo.host("B").address == "198.18.0.12"
    assert topo.node_by_address("198.18.0.11") is topo.nodes[0]
    assert topo.node_by_address(topo.vip) is None
    with pytest.raises(TopologyError, match="no host"):
        topo.host("Z")


# --- pure helpers of the probe ----------------------------------------------------------


def test_plan_flows_uses_distinct_reproducible_source_ports() -> None:
    client = describe(2, prefix="mhtU-").clients[0]
    flows = probe.plan_flows(client, "tcp", 3000, port_seed=42)
    assert flows == probe.plan_flows(client, "tcp", 3000, port_seed=42)
    assert flows != probe.plan_flows(client, "tcp", 3000, port_seed=43)
    assert len({p for _, p in flows}) == 3000
    assert {a for a, _ in flows} == {client.address}
    assert all(probe.PORT_RANGE[0] <= p < probe.PORT_RANGE[1] for _, p in flows)


def test_plan_flows_for_icmp_rotates_addresses_with_distinct_ids() -> None:
    client = describe(2, prefix="mhtU-").clients[0]
    flows = probe.plan_flows(client, "icmp", 500, port_seed=1)
    assert {a for a, _ in flows} == set(client.addresses)
    assert len({i for _, i in flows}) == 500
    assert all(1 <= i <= 0xFFFF for _, i in flows)
    with pytest.raises(LabError, match="sources"):
        probe.plan_flows(client, "udp", 10, port_seed=1, sources=99)


def test_expected_nodes_follow_the_model_for_the_vip_and_the_node_for_its_address() -> None:
    topo = describe(4, prefix="mhtU-", seed=0x5EED1234)
    flows = probe.plan_flows(topo.clients[0], "tcp", 200, port_seed=3)
    live = ["A", "C", "D"]
    got = probe.expected_nodes(topo, live=live, target=topo.vip, proto="tcp", port=80, flows=flows)
    owners = assign(slots_of(live, topo.members), default_table())
    for (saddr, sport), node in zip(flows, got, strict=True):
        flow = Flow(ipaddress.ip_address(saddr), sport, ipaddress.ip_address(topo.vip), 80)
        slot = owners.owner(flow_bucket(flow, 40320, 0x5EED1234))
        assert node == topo.members[slot]  # type: ignore[index]
    assert set(got) == {"A", "C", "D"}
    direct = probe.expected_nodes(
        topo, live=live, target="198.18.0.12", proto="tcp", port=80, flows=flows
    )
    assert set(direct) == {"B"}
    none = probe.expected_nodes(topo, live=[], target=topo.vip, proto="udp", port=7, flows=flows)
    assert set(none) == {None}
    with pytest.raises(LabError, match="neither"):
        probe.expected_nodes(topo, live=live, target="198.18.0.201", proto="tcp", port=80, flows=[])


def test_parse_http_takes_the_body_first_line() -> None:
    ok = b"HTTP/1.1 200 OK\r\nServer: nginx\r\n\r\nC\nnode=C server=...\n"
    assert probe_worker.parse_http(ok) == ("C", "")
    assert probe_worker.parse_http(b"HTTP/1.1 404 Not Found\r\n\r\nx")[0] == ""
    assert probe_worker.parse_http(b"")[1] == "empty response"
    assert probe_worker.parse_http(b"HTTP/1.1 200 OK\r\n")[1] == "no HTTP header end"


def test_echo_request_checksum_and_reply_parsing() -> None:
    req = echo_bytes = probe_worker.echo_request(0x1234, 1, b"multihost-probe")
    assert probe_worker.icmp_checksum(req) == 0  # a correct checksum sums to zero
    reply = b"\x00" + echo_bytes[1:2] + b"\x00\x00" + echo_bytes[4:]
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(reply), 0, 0, 64, 1, 0,
        socket.inet_aton("198.18.0.100"), socket.inet_aton("198.18.1.3"),
    )  # fmt: skip
    frame = bytes.fromhex("026d680c0001026d680a0002") + b"\x08\x00" + ip + reply
    parsed = probe_worker.parse_echo_reply(frame)
    assert parsed == ("02:6d:68:0a:00:02", "198.18.0.100", "198.18.1.3", 0x1234)
    assert probe_worker.parse_echo_reply(frame[:20]) is None


def test_icmpv6_echo_request_and_reply_parsing() -> None:
    req = probe_worker.echo_request(0x1234, 1, b"multihost-probe", v6=True)
    assert req[:2] == b"\x80\x00" and req[4:8] == b"\x12\x34\x00\x01"  # the kernel sums it
    reply = b"\x81\x00\x00\x00" + req[4:]
    src = socket.inet_pton(socket.AF_INET6, "2001:db8::100")
    dst = socket.inet_pton(socket.AF_INET6, "2001:db8::1:1")
    ip = struct.pack("!IHBB16s16s", 6 << 28, len(reply), socket.IPPROTO_ICMPV6, 64, src, dst)
    frame = bytes.fromhex("026d680c0001026d680a0002") + b"\x86\xdd" + ip + reply
    parsed = probe_worker.parse_echo_reply(frame)
    assert parsed == ("02:6d:68:0a:00:02", "2001:db8::100", "2001:db8::1:1", 0x1234)
    assert probe_worker.parse_echo_reply(frame[:60]) is None  # truncated
    request = frame[:54] + b"\x80" + frame[55:]  # an echo request is not a reply
    assert probe_worker.parse_echo_reply(request) is None


def test_icmp_band_counts_source_addresses_not_flows() -> None:
    # 200 ICMP flows from 16 addresses: 16 independent hash keys of 12 or 13 flows each
    r = probe.ProbeResult("icmp", "198.18.0.100", 200, shares={"A": Fraction(1, 4)})
    r.hash_keys = 16
    lo, hi = probe.binomial_band(16, 0.25)
    assert r.band == {"A": (lo * 12, hi * 13)}
    r.answered = {"A": 83}  # 83 = 6 or 7 addresses: a plausible draw, not an outlier
    assert r.outside_band == [] and r.to_dict()["hash_keys"] == 16
    tcp = probe.ProbeResult("tcp", "198.18.0.100", 200, shares={"A": Fraction(1, 4)})
    assert tcp.band == {"A": probe.binomial_band(200, 0.25)}
    assert tcp.to_dict()["hash_keys"] == 200


def test_udpecho_reply_starts_with_the_node_name() -> None:
    assert udpecho.reply_for("B", b"hello") == b"B\nhello"
    assert len(udpecho.reply_for("B", bytes(70000))) == udpecho.MAX_REPLY
