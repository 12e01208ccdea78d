"""A client behind a router (``lab up --routed``): the router reaches the traffic IP only
through a static neighbour entry with the multicast MAC, as routers that follow RFC 1812
(and refuse ARP replies carrying a multicast MAC) need; and every lab object is gone after
``lab down`` and ``lab clean``.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator

import pytest

from multihost.lab import backbuild, build
from multihost.lab.backnet import NeighMode, ReturnMode
from multihost.lab.clean import clean, lab_namespaces, pids_in_namespaces
from multihost.lab.naming import state_dir
from multihost.lab.probe import ProbeResult, run_probe
from multihost.lab.state import LabError, LabState
from multihost.lab.topology import describe

CLI = [sys.executable, "-m", "multihost"]


def assert_clean(r: ProbeResult, n: int) -> None:
    assert (r.failed, r.reset, r.timeout, r.duplicated, r.mispredicted) == (0, 0, 0, 0, 0), (
        r.to_dict()
    )
    assert sum(r.answered.values()) == n


def refused(state: LabState) -> int:
    """ARP replies with a multicast sender MAC the router dropped (its RFC 1812 filter)."""
    rt = state.topology.router
    assert rt is not None
    out = subprocess.run(
        ["ip", "netns", "exec", rt.netns, "nft", "-j", "list", "counter", "arp",
         "multihost_lab", "refused"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    counters = [o["counter"] for o in json.loads(out)["nftables"] if "counter" in o]
    return int(counters[0]["packets"])


@pytest.fixture(scope="module")
def routed(lab_backend: str) -> Iterator[LabState]:
    prefix = f"mhtR{secrets.token_hex(2)}-"
    try:
        yield build.build(describe(4, prefix=prefix, routed=True), manual=True, backend=lab_backend)
    finally:
        clean(prefix)
        assert lab_namespaces(prefix) == [] and not state_dir(prefix).exists()


def test_routed_client_is_answered_by_the_predicted_nodes(routed: LabState) -> None:
    topo = routed.topology
    neigh = backbuild.router_neigh(routed)
    assert [(e["lladdr"], e["state"]) for e in neigh] == [(topo.group_mac, ["PERMANENT"])]
    r = run_probe(routed, "tcp", 3000, port_seed=21)
    assert_clean(r, 3000)
    assert set(r.answered) == set(topo.members)
    assert_clean(run_probe(routed, "udp", 1000, port_seed=22), 1000)
    with pytest.raises(LabError, match="routed"):
        run_probe(routed, "icmp", 10)


def test_a_router_that_refuses_multicast_arp_replies_needs_the_static_entry() -> None:
    prefix = f"mhtR{secrets.token_hex(2)}-"
    try:
        topo = describe(2, prefix=prefix, routed=True, router_neigh=NeighMode.ARP)
        state = build.build(topo, manual=True, backend="nft")
        r = run_probe(state, "tcp", 60, port_seed=23, timeout=1.0)
        assert r.timeout == 60 and not r.answered, r.to_dict()
        assert refused(state) > 0  # the agents did answer its ARP requests
        assert all(e.get("lladdr") != topo.group_mac for e in backbuild.router_neigh(state))
        rt = topo.router
        assert rt is not None
        # the documented fix (docs/switches.md)
        subprocess.run(
            ["ip", "-n", rt.netns, "neigh", "replace", topo.vip, "lladdr", topo.group_mac,
             "dev", rt.interface, "nud", "permanent"],
            check=True,
        )  # fmt: skip
        assert_clean(run_probe(state, "tcp", 500, port_seed=24), 500)
    finally:
        clean(prefix)


def test_lab_down_and_lab_clean_remove_every_object_of_a_transparent_routed_lab() -> None:
    prefix = f"mhtR{secrets.token_hex(2)}-"
    try:
        topo = describe(2, prefix=prefix, routed=True, transparent=ReturnMode.ROUTES)
        state = build.build(topo, manual=True, backend="nft")
        names = set(state.namespaces)
        assert {f"{prefix}{n}" for n in ("sw", "bsw", "rt", "b1", "b2", "A", "B", "c1")} == names
        r = run_probe(state, "tcp", 500, port_seed=25)
        assert_clean(r, 500)
        assert r.transparency is not None and r.transparency["seen_client"] == 500
        assert r.transparency["stray_replies"] == 0
        pids = pids_in_namespaces(names)
        assert len(pids) >= 2 * 2 + 2 * 2 + 2  # nginx master+worker per node and back end, ...
        down = subprocess.run(
            [*CLI, "lab", "down", "--prefix", prefix, "--json"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert down.returncode == 0, down.stderr
        assert set(json.loads(down.stdout)["namespaces"]) == names
        assert lab_namespaces(prefix) == [] and not state_dir(prefix).exists()
        assert pids_in_namespaces(names) == {}
        assert all(not _alive(p) for p in pids)
        # a crashed builder: the lab is up but its state file is lost; 'lab clean' finds
        # every namespace by name (back-end switch, back ends, router included)
        state = build.build(topo, manual=True, backend="nft")
        pids = pids_in_namespaces(names)
        state.path.unlink()
        out = subprocess.run(
            [*CLI, "lab", "clean", "--prefix", prefix, "--json"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        assert set(json.loads(out.stdout)["namespaces"]) == names
        assert lab_namespaces(prefix) == [] and not state_dir(prefix).exists()
        assert all(not _alive(p) for p in pids)
    finally:
        clean(prefix)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
