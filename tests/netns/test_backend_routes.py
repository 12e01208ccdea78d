"""``multihost backend-routes --apply/--remove`` on a real back end (root).

A namespace plays the back end (``eth1`` on a bridge, with an address, a rule and a table
of its own that must survive); three namespaces play nodes A, B, C (slots 0, 5, 2), each
with its back-end-facing gateway address on the bridge and the same "client" address on
``lo``.  The back end has no default route, so a reply to a client can only leave through
a per-node table.  Checked: ``--apply`` twice (the second changes nothing), an echo
request from each per-node source address reaches exactly that node (its ICMP InEchos
counter) and its reply comes back, a clash is refused before anything changes, and
``--remove`` leaves ``ip rule``, ``ip route show table all`` and ``ip addr`` as before.

Namespaces are ``mhb-<pid>-<n>-<role>`` (deleted on exit, also on failure; stale ones of
dead runs first); traffic only between them, addresses in 198.18.0.0/15.
"""

from __future__ import annotations

import itertools
import json
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from multihost.dataplane.nft import netns_entered
from tests.netns import nsutil
from tests.netns.nsutil import _icmp_checksum

PREFIX = "mhb-"
CLIENT = "198.18.200.1"  # "the client": on every node's lo, reached only via a node table
NODES = {"A": (0, "198.19.0.1", "198.19.0.101"), "B": (5, "198.19.0.2", "198.19.0.102")}
NODES["C"] = (2, "198.19.0.3", "198.19.0.103")
_idents = itertools.count(0x6D00)

CONFIG = """
[cluster]
name = "mhb"
interface = "eth0"
multicast_group = "239.192.0.1"
key_file = "key"

{nodes}

[[traffic_ip_group]]
name = "web"
addresses = ["198.18.0.100"]
members = ["A", "B", "C"]

[[backend]]
name = "db1"
interface = "eth1"
addresses = {{ {addresses} }}
table_base = 4100
rule_priority_base = 4100
"""


def config_text() -> str:
    nodes = "\n".join(
        f'[[node]]\nname = "{n}"\naddress = "198.18.0.{11 + i}"\nslot = {slot}\n'
        f'backend_gateway = "{gw}"\n'
        for i, (n, (slot, gw, _)) in enumerate(NODES.items())
    )
    addrs = ", ".join(f'{n} = "{be}/24"' for n, (_, _, be) in NODES.items())
    return CONFIG.format(nodes=nodes, addresses=addrs)


def ip(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    assert ns.startswith(PREFIX), ns
    return nsutil.run("ip", "-n", ns, *args, check=check)


def in_ns(ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    assert ns.startswith(PREFIX), ns
    return nsutil.run("ip", "netns", "exec", ns, *args, check=False)


def cli(ns: str, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "multihost", "backend-routes", "--config", str(config)]
    return in_ns(ns, *cmd, "--backend", "db1", *args)


def state(ns: str) -> dict[str, str]:
    return {
        "rule": ip(ns, "rule", "show").stdout + ip(ns, "-6", "rule", "show").stdout,
        "route": ip(ns, "route", "show", "table", "all").stdout
        + ip(ns, "-6", "route", "show", "table", "all").stdout,
        "addr": ip(ns, "addr", "show").stdout,
    }


def in_echos(ns: str) -> int:
    lines = [ln.split() for ln in in_ns(ns, "cat", "/proc/net/snmp").stdout.splitlines()]
    head, values = (ln for ln in lines if ln[0] == "Icmp:")
    return int(values[head.index("InEchos")])


def echo(ns: str, source: str, timeout: float = 5.0) -> bool:
    """One ICMP echo request from ``source`` (bound) to the client: whether the reply came
    back within ``timeout`` (a request the kernel cannot route is a False at once)."""
    ident = next(_idents)
    with (
        netns_entered(ns),
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s,
    ):
        s.bind((source, 0))
        rest = struct.pack("!HH", ident, 1) + b"mhb-backend"
        csum = _icmp_checksum(struct.pack("!BBH", 8, 0, 0) + rest + bytes(len(rest) % 2))
        try:
            s.sendto(struct.pack("!BBH", 8, 0, csum) + rest, (CLIENT, 0))
        except OSError:  # ENETUNREACH: no route for this source
            return False
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([s], [], [], left)[0]:
                break
            data, (peer, _) = s.recvfrom(2048)
            ihl = (data[0] & 0x0F) * 4
            kind, _, _, rid = struct.unpack_from("!BBHH", data, ihl)
            if kind == 0 and rid == ident and peer == CLIENT:
                return True
    return False


@pytest.fixture
def net(tmp_path: Path) -> Iterator[dict[str, Any]]:
    with backend_net(tmp_path) as n:
        yield n


@contextmanager
def backend_net(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The back end, a bridge and the nodes (namespaces deleted on exit, also on failure)."""
    nsutil.cleanup_stale(PREFIX)
    with nsutil.netns_group("be", "sw", *NODES, prefix=PREFIX) as ns:
        be = ns["be"]
        in_ns(be, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")  # a stable baseline
        ip(ns["sw"], "link", "add", "mhb-br", "type", "bridge", "stp_state", "0")
        ip(ns["sw"], "link", "set", "mhb-br", "up")
        ports = {"be": "eth1", **{n: "mhb-n0" for n in NODES}}
        for role, ifname in ports.items():
            port = f"mhb-p-{role}"
            ip(
                ns["sw"],
                "link",
                "add",
                port,
                "type",
                "veth",
                "peer",
                "name",
                ifname,
                "netns",
                ns[role],
            )
            ip(ns["sw"], "link", "set", port, "master", "mhb-br", "up")
            ip(ns[role], "link", "set", ifname, "up")
        for n, (_, gw, _) in NODES.items():
            ip(ns[n], "addr", "add", f"{gw}/24", "dev", "mhb-n0")
            ip(ns[n], "addr", "add", f"{CLIENT}/32", "dev", "lo")
        # The back end's own things, which --apply/--remove must leave alone.
        ip(be, "addr", "add", "198.19.0.200/24", "dev", "eth1")
        ip(be, "route", "add", "198.18.250.0/24", "via", "198.19.0.1", "table", "50")
        ip(be, "rule", "add", "from", "198.19.0.200", "lookup", "50", "priority", "500")
        nsutil.wait_until(
            lambda: "fe80::" in ip(be, "-6", "route", "show", "table", "all").stdout,
            what="the back end's IPv6 link-local route",
        )
        config = tmp_path / "multihost.toml"
        config.write_text(config_text())
        yield {"ns": ns, "be": be, "config": config}


def results(proc: subprocess.CompletedProcess[str]) -> list[str]:
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["ok"] is True
    return [s["result"] for s in out["steps"]]


def test_apply_twice_route_by_source_then_remove(net: dict[str, Any]) -> None:
    ns, be, config = net["ns"], net["be"], net["config"]
    before = state(be)
    # No default route: the back end's own address cannot reach the client.
    assert not echo(be, "198.19.0.200", timeout=1)

    assert results(cli(be, config, "--apply", "--json")) == ["added"] * 9
    applied = state(be)
    assert "4100:\tfrom 198.19.0.101 lookup 4100" in applied["rule"]
    assert "default via 198.19.0.2 dev eth1 table 4105 proto static" in applied["route"]
    second = cli(be, config, "--apply", "--json")
    assert results(second) == ["present"] * 9
    assert json.loads(second.stdout)["changed"] == 0
    assert state(be) == applied

    # Still none for the back end's own address; each node's address goes via that node.
    assert not echo(be, "198.19.0.200", timeout=1)
    for name, (_, _, addr) in NODES.items():
        counts = {n: in_echos(ns[n]) for n in NODES}
        assert echo(be, addr), f"no echo reply for a request from {addr}"
        got = {n: in_echos(ns[n]) - counts[n] for n in NODES}
        assert got == {n: int(n == name) for n in NODES}, (name, got)
    text = cli(be, config, "--apply")
    assert text.returncode == 0
    assert text.stdout.splitlines()[-1] == "# back end 'db1': 0 added, 9 unchanged"

    removed = cli(be, config, "--remove", "--json")
    assert results(removed) == ["removed"] * 9
    assert state(be) == before
    assert results(cli(be, config, "--remove", "--json")) == ["absent"] * 9
    assert state(be) == before


def test_a_clash_is_refused_before_anything_changes(net: dict[str, Any]) -> None:
    be, config = net["be"], net["config"]
    ip(be, "route", "add", "default", "via", "198.19.0.9", "table", "4102")  # C's table
    before = state(be)
    proc = cli(be, config, "--apply", "--json")
    assert proc.returncode == 1
    got = json.loads(proc.stdout)
    assert got["ok"] is False and got["code"] == 1
    assert "table 4102 already has a default route (via 198.19.0.9 dev eth1)" in got["error"]
    assert proc.stderr == f"multihost: error: {got['error']}\n"
    assert state(be) == before
