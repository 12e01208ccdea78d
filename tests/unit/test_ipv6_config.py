"""IPv6 in the configuration and the lab description (pure): heartbeats over IPv6, dual
stack, the MAC of each family's traffic IPs, and the dual-stack lab's addressing plan."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest

from multihost import preflight
from multihost.config import ConfigError, parse_config
from multihost.lab.addressing import GROUP_RANGE6, LAB_RANGE6, SUBNET6
from multihost.lab.agents import config_text
from multihost.lab.naming import TopologyError
from multihost.lab.topology import Topology, describe
from multihost.macaddr import format_mac, multicast_mac

V6_ONLY = """
[cluster]
name = "c6"
interface = "eth0"
multicast_group = "ff15::1:2"
key_file = "key"

[[node]]
name = "A"
address = "2001:db8::11"
slot = 0

[[node]]
name = "B"
address = "fe80::12"
slot = 1

[[traffic_ip_group]]
name = "web"
addresses = ["2001:db8::100"]
members = ["A", "B"]
"""


def test_ipv6_only_cluster() -> None:
    cfg = parse_config(V6_ONLY, "c6.toml")
    c = cfg.cluster
    assert c.multicast_group == ipaddress.IPv6Address("ff15::1:2")
    assert (c.arp_group, c.ndp_group) == (None, c.multicast_group)
    assert c.groups == (c.multicast_group,)
    assert format_mac(multicast_mac(c.multicast_group)) == "33:33:00:01:00:02"
    preflight.check(cfg)  # what the agent accepts: IPv6 node addresses, link-local too
    assert preflight.heartbeat_address(cfg, "B") == ipaddress.IPv6Address("fe80::12")


def test_dual_stack_with_ipv4_heartbeats() -> None:
    text = V6_ONLY.replace('multicast_group = "ff15::1:2"', 'multicast_group = "239.192.0.7"')
    text = text.replace('"2001:db8::11"', '"198.18.0.11"').replace('"fe80::12"', '"198.18.0.12"')
    with pytest.raises(ConfigError, match=r"cluster\.multicast_group6: is required for the IPv6"):
        parse_config(text, "d.toml")
    text = text.replace('key_file = "key"', 'key_file = "key"\nmulticast_group6 = "ff15::7"')
    text = text.replace(
        'addresses = ["2001:db8::100"]', 'addresses = ["198.18.0.100", "2001:db8::100"]'
    )
    cfg = parse_config(text, "d.toml")
    c = cfg.cluster
    assert c.arp_group == ipaddress.IPv4Address("239.192.0.7")
    assert c.ndp_group == ipaddress.IPv6Address("ff15::7")
    assert c.groups == (c.arp_group, c.ndp_group)
    preflight.check(cfg)


def test_dual_stack_with_ipv6_heartbeats_needs_an_ipv4_group_for_arp() -> None:
    text = V6_ONLY.replace(
        'addresses = ["2001:db8::100"]', 'addresses = ["2001:db8::100", "198.18.0.100"]'
    )
    with pytest.raises(ConfigError, match=r"cluster\.multicast_group4: is required for the IPv4"):
        parse_config(text, "d.toml")
    cfg = parse_config(
        text.replace('key_file = "key"', 'key_file = "key"\nmulticast_group4 = "239.192.0.9"')
    )
    assert cfg.cluster.arp_group == ipaddress.IPv4Address("239.192.0.9")


@pytest.mark.parametrize(
    ("old", "new", "key", "reason"),
    [
        ('"ff15::1:2"', '"ff02::1"', "cluster.multicast_group", "permanent, well-known"),
        ('"ff15::1:2"', '"ff13::1"', "cluster.multicast_group", "has scope 3"),
        ('"ff15::1:2"', '"2001:db8::1"', "cluster.multicast_group", "not a multicast address"),
        ('"fe80::12"', '"fe80::12%eth0"', "node[1].address", "without %zone"),
        ('"fe80::12"', '"198.18.0.12"', "node[1].address", "must be IPv6 too"),
    ],
)
def test_ipv6_errors_name_the_key(old: str, new: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as e:
        preflight.check(parse_config(V6_ONLY.replace(old, new), "c6.toml"))
    assert e.value.key == key and reason in e.value.reason, str(e.value)


def test_dual_stack_lab_plan() -> None:
    topo = describe(4, 2, "mhu-", seed=5, ipv6=True)
    assert topo.ipv6 and topo.vips == ("198.18.0.100", "2001:db8::100")
    assert topo.heartbeat_group == "ff15::1" and ipaddress.ip_address("ff15::1") in GROUP_RANGE6
    assert topo.group6_mac == "33:33:00:00:00:01"
    assert SUBNET6.subnet_of(LAB_RANGE6)
    for h in topo.hosts:
        assert h.addresses6 and all(ipaddress.IPv6Address(a) in SUBNET6 for a in h.addresses6)
    assert topo.nodes[0].address6 == "2001:db8::11"
    assert len(topo.clients[1].sources(6)) == len(topo.clients[1].sources(4)) == 17
    assert Topology.from_dict(json.loads(json.dumps(topo.to_dict()))) == topo
    s = topo.summary()
    assert s["ipv6"] is True and s["vip6"] == "2001:db8::100"
    assert s["nodes"]["A"]["address6"] == "2001:db8::11"
    v4 = describe(2, prefix="mhu-", seed=5)
    assert not v4.ipv6 and v4.vips == ("198.18.0.100",) and v4.summary()["vip6"] is None
    with pytest.raises(TopologyError, match="no IPv6 traffic IP"):
        v4.vip_of(6)


def test_dual_stack_lab_configuration_is_what_the_agent_accepts() -> None:
    topo = describe(3, prefix="mhu-", seed=5, ipv6=True)
    cfg = parse_config(config_text(topo, Path("/k")), "lab.toml")
    preflight.check(cfg)
    assert cfg.cluster.multicast_group == ipaddress.IPv6Address("ff15::1")
    assert cfg.cluster.arp_group == ipaddress.IPv4Address(topo.group)
    assert [str(n.address) for n in cfg.nodes] == ["2001:db8::11", "2001:db8::12", "2001:db8::13"]
    assert [str(a) for a in cfg.groups[0].addresses] == list(topo.vips)


def test_old_lab_records_still_load() -> None:
    d = describe(2, prefix="mhu-", seed=5).to_dict()
    del d["vip6"], d["group6"]
    for h in d["nodes"] + d["clients"]:
        del h["addresses6"]
    assert not Topology.from_dict(d).ipv6
