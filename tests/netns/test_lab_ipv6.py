"""IPv6 end to end (root): a dual-stack 4-node lab whose agents heartbeat over IPv6.

With real packets, on both data planes: the agents join ``ff15::1`` and converge; TCP and UDP
to the IPv6 traffic IP are each answered by exactly the predicted node (and IPv4 still is:
one group, both families, one bucket space); the client's kernel resolves the IPv6 traffic
IP by NS/NA to the group's ``33:33`` MAC, never a node's; a crashed or unplugged node's
share moves to the survivors and comes back on recovery; and the brief's worked example
runs over IPv6.  Every lab is removed even when a test fails.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from multihost.lab import build, demo, failover, faults
from multihost.lab.clean import clean
from multihost.lab.naming import NETNS_DIR, state_dir
from multihost.lab.probe import ProbeResult, run_probe
from multihost.lab.state import LabState
from multihost.lab.topology import describe


@pytest.fixture(scope="module")
def lab(lab_backend: str) -> Iterator[LabState]:
    prefix = f"mht6{secrets.token_hex(2)}-"
    try:
        state = build.build(describe(4, prefix=prefix, ipv6=True), backend=lab_backend)
        assert set(state.agents["dataplane"].values()) == {lab_backend}
        failover.wait_converged(state, ["A", "B", "C", "D"], timeout=30, quiet=True)
        yield state
    finally:
        clean(prefix)
        assert not state_dir(prefix).exists()
        assert not list(NETNS_DIR.glob(f"{prefix}*"))


def assert_clean(r: ProbeResult, n: int, nodes: set[str]) -> None:
    assert r.connections == n
    assert (r.failed, r.reset, r.timeout, r.duplicated) == (0, 0, 0, 0), r.to_dict()
    assert r.mispredicted == 0, r.to_dict()
    assert set(r.answered) == nodes, r.to_dict()


def _ns(lab: LabState, host: str, *cmd: str) -> str:
    netns = lab.topology.host(host).netns
    return subprocess.run(
        ["ip", "netns", "exec", netns, *cmd], capture_output=True, text=True, check=True
    ).stdout


def test_heartbeats_go_over_ipv6(lab: LabState) -> None:
    config = Path(lab.agents["config"]).read_text(encoding="utf-8")
    assert 'multicast_group = "ff15::1"' in config
    assert 'address = "2001:db8::11"' in config
    for node in lab.topology.members:
        sockets = _ns(lab, node, "ss", "-u", "-a", "-n", "-H")
        assert "[ff15::1]%eth0:7946" in sockets, (node, sockets)
        # lab up starts the agents after DAD: none starts fenced and joins late
        log = (lab.directory / f"agent-{node}.log").read_text(encoding="utf-8")
        assert "event=fenced" not in log, (node, log[-2000:])


def test_tcp_and_udp_over_ipv6_each_answered_by_the_predicted_node(lab: LabState) -> None:
    r = run_probe(lab, "tcp", 2000, port_seed=61, family=6)
    assert r.target == "2001:db8::100"
    assert_clean(r, 2000, {"A", "B", "C", "D"})
    assert_clean(run_probe(lab, "udp", 1000, port_seed=62, family=6), 1000, {"A", "B", "C", "D"})


def test_icmpv6_echo_answered_by_exactly_the_predicted_node(lab: LabState) -> None:
    # ICMPv6 hashes the addresses only: 17 client sources spread the echoes over the nodes
    r = run_probe(lab, "icmp", 340, port_seed=68, family=6)
    assert r.target == "2001:db8::100"
    assert r.connections == 340
    assert (r.failed, r.reset, r.timeout, r.duplicated, r.mispredicted) == (0, 0, 0, 0, 0), (
        r.to_dict()
    )
    assert len(r.answered) >= 2, r.to_dict()


def test_curl_and_wrk_reach_nginx_on_the_ipv6_traffic_ip(lab: LabState) -> None:
    url = f"http://[{lab.topology.vip6}]/"
    body = _ns(lab, "c1", "curl", "-sS", "-g", "--max-time", "5", url)
    assert body.split("\n", 1)[0] in lab.topology.members, body
    out = _ns(lab, "c1", "wrk", "-t1", "-c8", "-d1s", url)
    assert "Non-2xx" not in out and "Socket errors" not in out, out


def test_ipv4_still_served_by_the_same_group(lab: LabState) -> None:
    assert_clean(run_probe(lab, "tcp", 1000, port_seed=63), 1000, {"A", "B", "C", "D"})


def test_ns_is_answered_with_the_ipv6_multicast_mac_never_a_node_mac(lab: LabState) -> None:
    topo = lab.topology
    c = topo.clients[0]
    _ns(lab, c.name, "ip", "-6", "neigh", "flush", "dev", c.interface)
    r = run_probe(lab, "tcp", 50, port_seed=64, family=6)  # the kernel sends the NS
    assert r.failed + r.timeout == 0, r.to_dict()
    assert topo.vip6 is not None
    neigh: list[dict[str, Any]] = json.loads(
        _ns(lab, c.name, "ip", "-j", "-6", "neigh", "show", topo.vip6)
    )
    macs = {e.get("lladdr") for e in neigh}
    assert macs == {"33:33:00:00:00:01"} == {topo.group6_mac}, neigh
    assert not macs & {n.mac for n in topo.nodes}


@pytest.mark.parametrize("how", ["crash", "link"])
def test_a_failed_nodes_share_moves_and_comes_back(lab: LabState, how: str) -> None:
    faults.fail(lab, "D", how)
    try:
        failover.wait_converged(lab, ["A", "B", "C"], timeout=20)
        r = run_probe(lab, "tcp", 1000, port_seed=65, family=6)
        assert_clean(r, 1000, {"A", "B", "C"})
    finally:
        faults.recover(lab, "D")
    failover.wait_converged(lab, ["A", "B", "C", "D"], timeout=20)
    assert_clean(run_probe(lab, "tcp", 1000, port_seed=66, family=6), 1000, {"A", "B", "C", "D"})


def test_a_node_whose_link_returns_takes_no_flow_before_it_can_answer_over_ipv6(
    lab: LabState,
) -> None:
    """After its link comes back, a node's link-local address is tentative until DAD ends,
    and the kernel sends no Neighbor Solicitation for a reply from a traffic IP meanwhile:
    a SYN taken then is answered seconds later (chaos --ipv6: duplicates when the bucket
    moved meanwhile).  With DAD stretched to >= 4 s, D must stay fenced until its
    link-local address is usable, and be exact at once when it serves again."""
    iface = lab.topology.host("D").interface
    dad = f"net.ipv6.conf.{iface}.dad_transmits"
    before = _ns(lab, "D", "sysctl", "-n", dad).strip()
    _ns(lab, "D", "sysctl", "-qw", f"{dad}=4")
    try:
        faults.fail(lab, "D", "link")
        try:
            failover.wait_converged(lab, ["A", "B", "C"], timeout=20)
        finally:
            faults.recover(lab, "D")
        up = time.monotonic()
        while True:
            status = failover.agent_status(lab, "D")
            if status is not None and status["groups"]["web"]["owned"]["ranges"]:
                break  # D takes new flows again
            assert time.monotonic() - up < 30, "D never served again"
            time.sleep(0.02)
        took = time.monotonic() - up
        tentative = _ns(lab, "D", "ip", "-6", "addr", "show", "dev", iface, "tentative")
        assert not tentative.strip(), (took, tentative)
        assert took > 2.0, took  # it did wait for DAD (>= 4 probes, 1 s apart)
        failover.wait_converged(lab, ["A", "B", "C", "D"], timeout=20)
        r = run_probe(lab, "tcp", 1000, port_seed=67, family=6)
        assert_clean(r, 1000, {"A", "B", "C", "D"})
    finally:
        _ns(lab, "D", "sysctl", "-qw", f"{dad}={before}")


def test_worked_example_over_ipv6(lab_backend: str) -> None:
    prefix = f"mht6d{secrets.token_hex(2)}-"
    cfg = demo.DemoConfig(connections=1200, prefix=prefix, backend=lab_backend, ipv6=True)
    try:
        result = demo.run_demo(cfg)
    finally:
        clean(prefix)
    assert result["family"] == "ipv6" and result["target"] == "2001:db8::100"
    assert [s["live"] for s in result["steps"]] == [
        ["A", "B", "C", "D"],
        ["A", "B", "C"],
        ["A", "B"],
        ["A", "B", "D"],
    ]
    for s in result["steps"]:
        assert (s["failed"], s["duplicates"], s["mispredicted"]) == (0, 0, 0), s
        assert set(s["observed"]) == set(s["live"]), s
