"""Pure checks of what a lab has behind its nodes (--transparent) and in front (--routed)."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest

from multihost.backendplan import plan
from multihost.backends import find_backend
from multihost.config import parse_config
from multihost.lab import backbuild, backprobe, probe_worker
from multihost.lab.addressing import LAB_RANGE, SUBNET
from multihost.lab.agents import config_text
from multihost.lab.backnet import (
    BACK_SUBNET,
    RETURN_VIP,
    ROUTED_SUBNET,
    NeighMode,
    Proxy,
    ReturnMode,
    client_link,
)
from multihost.lab.naming import TopologyError, netns_pattern
from multihost.lab.topology import Topology, describe


@pytest.mark.parametrize("nodes", [1, 4, 8])
def test_transparent_routes_lab_has_an_address_per_node_on_each_back_end(nodes: int) -> None:
    topo = describe(nodes, prefix="mhtU-", transparent=ReturnMode.ROUTES)
    bn = topo.backnet
    assert bn is not None and bn.mode is ReturnMode.ROUTES and bn.return_vip is None
    assert [b.name for b in bn.backends] == ["b1", "b2"]
    every = [a for _, a in bn.gateways] + [a for b in bn.backends for a in b.addresses]
    assert len(set(every)) == len(every)
    for a in every:
        ip = ipaddress.IPv4Address(a)
        assert ip in LAB_RANGE and ip in BACK_SUBNET and ip not in SUBNET
    for b in bn.backends:
        assert [n for n, _ in b.node_addresses] == list(topo.members)
        assert len({b.address_for(n) for n in topo.members}) == nodes
        assert b.node_of(b.address_for("A")) == "A"
    names = topo.netns_names()
    assert {"mhtU-bsw", "mhtU-b1", "mhtU-b2"} <= set(names)
    assert all(netns_pattern("mhtU-").match(n) for n in names)
    assert Topology.from_dict(json.loads(json.dumps(topo.to_dict()))) == topo
    assert topo.summary()["transparent"]["backends"]["b1"]["node_addresses"]["A"] == "198.19.1.11"
    assert topo.summary()["routed"] is None


def test_transparent_gateway_lab_has_a_return_traffic_ip_and_one_address_per_back_end() -> None:
    topo = describe(4, prefix="mhtU-", transparent=ReturnMode.GATEWAY)
    bn = topo.backnet
    assert bn is not None and bn.return_vip == RETURN_VIP
    assert all(b.node_addresses == () for b in bn.backends)
    assert {b.address_for("C") for b in bn.backends} == {"198.19.1.1", "198.19.2.1"}
    assert bn.proxy is Proxy.HAPROXY and topo.hash_mode == "source-ip-port"
    assert "source 0.0.0.0 usesrc client\n" in backbuild.haproxy_conf(topo, "C")
    assert "server b2 198.19.2.1:80\n" in backbuild.haproxy_conf(topo, "C")
    assert "http-response set-header X-Multihost-Node C" in backbuild.haproxy_conf(topo, "C")
    nginx = describe(4, prefix="mhtU-", transparent=ReturnMode.GATEWAY, proxy=Proxy.NGINX)
    assert nginx.hash_mode == "source-ip"  # nginx binds the client's address only
    routes = describe(4, prefix="mhtU-", transparent=ReturnMode.ROUTES)
    assert routes.backnet is not None and routes.backnet.proxy is Proxy.NGINX
    assert routes.hash_mode == "4-tuple"
    assert "proxy_bind $remote_addr transparent;" in backbuild.proxy_location(routes, "A")
    assert "server 198.19.1.11:80" in backbuild.proxy_http(routes, "A")
    hap = describe(2, prefix="mhtU-", transparent=ReturnMode.ROUTES, proxy=Proxy.HAPROXY)
    assert "usesrc clientip\n" in backbuild.haproxy_conf(hap, "B")
    assert "server b1 198.19.1.12:80\n" in backbuild.haproxy_conf(hap, "B")


def test_routed_lab_puts_each_client_on_a_link_of_its_own_behind_the_router() -> None:
    topo = describe(3, 2, prefix="mhtU-", routed=True)
    rt = topo.router
    assert rt is not None and rt.neigh is NeighMode.STATIC and rt.netns == "mhtU-rt"
    assert ipaddress.IPv4Address(rt.address) in SUBNET
    for k, c in enumerate(topo.clients, 1):
        assert all(ipaddress.IPv4Address(a) in client_link(k) for a in c.addresses)
        assert client_link(k).subnet_of(ROUTED_SUBNET) and c.switch_port == c.name
    assert Topology.from_dict(json.loads(json.dumps(topo.to_dict()))) == topo
    assert topo.netns_of("rt") == "mhtU-rt" and topo.netns_of("sw") == "mhtU-sw"
    arp = describe(2, prefix="mhtU-", routed=True, router_neigh=NeighMode.ARP)
    assert arp.router is not None and arp.router.neigh is NeighMode.ARP


def test_transparent_and_routed_labs_are_ipv4_only() -> None:
    with pytest.raises(TopologyError, match="IPv4 only"):
        describe(2, prefix="mhtU-", routed=True, ipv6=True)
    with pytest.raises(TopologyError, match="IPv4 only"):
        describe(2, prefix="mhtU-", transparent=ReturnMode.ROUTES, ipv6=True)


def test_from_dict_rejects_a_back_end_address_outside_the_back_end_network() -> None:
    d = describe(2, prefix="mhtU-", transparent=ReturnMode.ROUTES).to_dict()
    d["backnet"]["backends"][0]["address"] = "198.18.0.55"
    with pytest.raises(TopologyError, match="outside"):
        Topology.from_dict(d)
    d = describe(2, prefix="mhtU-", transparent=ReturnMode.ROUTES).to_dict()
    d["backnet"]["backends"][1]["node_addresses"][0][1] = "198.19.0.11"  # A's gateway
    with pytest.raises(TopologyError, match="twice"):
        Topology.from_dict(d)


def test_netns_pattern_covers_the_back_end_network_and_router_exactly() -> None:
    pat = netns_pattern("mhtA-")
    assert all(pat.match(f"mhtA-{n}") for n in ("bsw", "rt", "b1", "b8"))
    assert not any(pat.match(f"mhtA-{n}") for n in ("b9", "b0", "bsww", "rt1", "b"))


def test_lab_config_has_the_back_ends_and_gateways_backend_routes_plans(tmp_path: Path) -> None:
    topo = describe(4, prefix="mhtU-", transparent=ReturnMode.ROUTES)
    text = config_text(topo, tmp_path / "key")
    cfg = parse_config(text, "lab.toml")
    b1 = find_backend(cfg.backends, "b1", "lab.toml")
    assert [str(p.gateway) for p in b1.paths] == [f"198.19.0.{11 + i}" for i in range(4)]
    text_steps = [s.command() for s in plan(b1).steps]
    assert "ip -4 rule add from 198.19.1.12 lookup 101 priority 1001" in text_steps
    assert "ip -4 route add default via 198.19.0.12 dev eth0 table 101 proto static" in text_steps
    assert 'transparent = true\nreturn = "routes"' in text
    gateway = describe(4, prefix="mhtU-", transparent=ReturnMode.GATEWAY)
    text = config_text(gateway, tmp_path / "key")
    assert "[[backend]]" not in text
    cfg = parse_config(text, "lab.toml")
    assert [(r.name, r.front, r.interface) for r in cfg.returns] == [("web_return", "web", "eth1")]
    assert [str(a) for a in cfg.returns[0].addresses] == [RETURN_VIP]
    assert cfg.groups[0].hash.value == "source-ip-port"


def test_node_nft_counts_replies_held_or_stray() -> None:
    bn = describe(2, prefix="mhtU-", transparent=ReturnMode.ROUTES).backnet
    assert bn is not None
    text = backbuild.node_nft(bn)
    assert "ip saddr 198.19.0.0/17 meta l4proto tcp fib daddr type != local" in text
    assert "socket transparent 1 counter name held accept" in text
    assert "ct state established,related counter name closed accept" in text
    assert text.index("name held accept") < text.index("name closed accept")
    assert text.index("name closed accept") < text.index("counter name stray")
    assert "meta mark" not in text  # the agents' plumbing marks


def test_probe_worker_reads_the_node_header_and_what_the_back_end_saw() -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nServer: nginx\r\nX-Multihost-Node: C\r\n\r\n"
        b"b2\nbackend=b2 client=198.18.0.201:40001 server=198.19.2.13:80\n"
    )
    assert probe_worker.parse_http(answer) == ("C", "")
    assert probe_worker.parse_backend(answer) == {"backend": "b2", "seen": "198.18.0.201:40001"}
    plain = b"HTTP/1.1 200 OK\r\n\r\nA\nnode=A\n"
    assert probe_worker.parse_http(plain) == ("A", "")
    assert probe_worker.parse_backend(plain) == {}


def test_transparency_is_clean_only_without_other_addresses_or_stray_replies() -> None:
    good = {
        "seen_other": 0,
        "no_backend": 0,
        "stray_replies": 0,
        "backend_log": {"b1": {"requests": 3, "client": 3, "other": 0}},
    }
    assert backprobe.clean(good)
    for key in ("seen_other", "no_backend", "stray_replies"):
        assert not backprobe.clean({**good, key: 1})
    assert not backprobe.clean(
        {**good, "backend_log": {"b1": {"requests": 3, "client": 2, "other": 1}}}
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--return", "gateway"], "--return gateway needs --transparent"),
        (["--proxy", "haproxy"], "--proxy haproxy needs --transparent"),
        (["--router-neigh", "arp"], "--router-neigh arp needs --routed"),
        (["--transparent", "--ipv6"], "IPv4 only"),
    ],
)
def test_lab_up_refuses_options_without_their_lab(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from multihost.cli import main

    assert main(["lab", "up", "--prefix", "mhtU-", *argv]) == 2
    assert message in capsys.readouterr().err
