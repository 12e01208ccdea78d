"""The nft data plane while ownership changes, in real namespaces (root).

Owns: the handover sets against conntrack (draining keeps established TCP and UDP, incoming
takes only new TCP; unicast frames too), the lease as a dead man's switch for new flows, and
failing closed when the process that owns the table dies (the guard table drops).  Lab and
fixtures as in ``test_dataplane.py`` (tests/netns/nsutil_dp.py, conftest.py).  No sleeps.
"""

from __future__ import annotations

import errno
import json
import random
import re
import select
import signal
import socket
import subprocess
import sys
from functools import partial

import pytest

from multihost.dataplane.nft import Dataplane, NftError
from multihost.dataplane.ruleset import GroupBuckets
from multihost.flowhash import HashMode
from tests.netns import nsutil
from tests.netns.nsutil_dp import (
    CLIENT,
    CONTIGUOUS,
    FOUR,
    POOL,
    SEED,
    SPEC1,
    VIP,
    B,
    Lab,
    established,
    predicted,
    random_flows,
    tcp_round,
    udp_round,
)

_HOLDER = """
import ipaddress, json, sys
from multihost.dataplane.nft import Dataplane
from multihost.dataplane.ruleset import GroupBuckets, GroupSpec, RulesetSpec
cfg = json.loads(sys.argv[1])
spec = RulesetSpec(cfg["b"], cfg["seed"], (GroupSpec("web", (ipaddress.ip_address(cfg["vip"]),)),))
Dataplane(spec).install({"web": GroupBuckets(owned=frozenset(cfg["owned"]))})
print("ready", flush=True)
sys.stdin.read()
"""


def test_fail_closed_when_the_owner_dies(lab: Lab) -> None:
    owned = CONTIGUOUS
    flows = random_flows(random.Random(4), 200, [80], [CLIENT])
    mine = sorted(predicted(flows, VIP, HashMode.FOUR_TUPLE, owned))[:3]
    cfg = json.dumps({"b": B, "seed": SEED, "vip": str(VIP), "owned": sorted(owned)})
    cmd = ["ip", "netns", "exec", lab.node, sys.executable, "-c", _HOLDER, cfg]
    holder = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    reader = Dataplane(SPEC1, lab.nft)  # reads counters only; never installs
    try:
        assert holder.stdout is not None
        ready, _, _ = select.select([holder.stdout], [], [], 20)
        assert ready and holder.stdout.readline().strip() == "ready"
        tables = nsutil.ns_run(lab.node, "nft", "list", "tables").stdout
        assert "table inet multihost\n" in tables and "multihost_guard" in tables
        # another process (the nft CLI, or our own context) cannot touch the owned table
        elem = "{ 1 : host }"
        cmd = ["nft", "add", "element", "inet", "multihost", "web_buckets", elem]
        cli = nsutil.ns_run(lab.node, *cmd, check=False)
        assert cli.returncode != 0 and "Operation not permitted" in cli.stderr
        with pytest.raises(NftError, match="Operation not permitted"):
            lab.nft.run("delete table inet multihost")
        assert udp_round(lab, reader, "web", VIP, mine) == set(mine)
        assert tcp_round(lab, reader, mine, set(mine)) == set(mine)

        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        nsutil.wait_until(
            lambda: (
                "table inet multihost\n"
                not in nsutil.ns_run(lab.node, "nft", "list", "tables").stdout
            ),
            what="the kernel to delete the owned table",
        )
        assert "multihost_guard" in nsutil.ns_run(lab.node, "nft", "list", "tables").stdout

        def guard_drops() -> int:
            items = lab.nft.run_json("list counter inet multihost_guard dropped")
            return int(items[0]["counter"]["packets"])

        def guard_dropped_since(before: int) -> bool:
            return guard_drops() > before

        for proto in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            r = nsutil.socket_in(lab.node, socket.AF_INET, proto)
            r.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            r.bind((str(VIP), 80))
            if proto == socket.SOCK_STREAM:
                r.listen(16)
            r.setblocking(False)
            c = nsutil.socket_in(lab.client, socket.AF_INET, proto)
            try:
                c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                c.setblocking(False)
                c.bind((str(CLIENT), 45678))
                before = guard_drops()
                if proto == socket.SOCK_DGRAM:
                    c.sendto(b"x", (str(VIP), 80))
                else:
                    assert c.connect_ex((str(VIP), 80)) == errno.EINPROGRESS
                nsutil.wait_until(partial(guard_dropped_since, before), what="the guard drop")
                if proto == socket.SOCK_DGRAM:
                    with pytest.raises(BlockingIOError):
                        r.recv(100)
                else:
                    assert select.select([], [c], [], 0)[1] == []  # still no SYN-ACK
            finally:
                c.close()
                r.close()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=10)


def test_handover_sets_follow_conntrack(lab: Lab) -> None:
    """draining keeps established TCP and all UDP; incoming takes new TCP (pure SYN) only."""
    dp = Dataplane(SPEC1, lab.nft)
    part = CONTIGUOUS
    dp.install({"web": GroupBuckets(owned=part)})
    rng = random.Random(5)
    mode = HashMode.FOUR_TUPLE
    a, c, e = sorted(predicted(random_flows(rng, 400, [80], POOL), VIP, mode, part))[:3]
    b, d = sorted(predicted(random_flows(rng, 400, [81], POOL), VIP, mode, part))[:2]

    with established(lab, a) as (conn, served):
        dp.update({"web": GroupBuckets(draining=part)})
        conn.sendall(b"established")
        assert served.recv(100) == b"established"  # established TCP survives draining
        assert tcp_round(lab, dp, [b], set()) == set()  # new TCP refused while draining
        assert udp_round(lab, dp, "web", VIP, [c]) == {c}  # UDP stays with the old owner

        dp.update({"web": GroupBuckets(incoming=part)})
        assert tcp_round(lab, dp, [d], {d}) == {d}  # new TCP accepted while incoming
        assert udp_round(lab, dp, "web", VIP, [e]) == set()  # new UDP is not taken early
        conn.sendall(b"still")
        assert served.recv(100) == b"still"  # this node's own connection: established


def test_handover_applies_to_unicast_frames_too(lab: Lab) -> None:
    """A packet that arrives as ``host`` (unicast MAC) in a handover bucket is still checked."""
    node_mac = json.loads(nsutil.ns_run(lab.node, "ip", "-j", "link", "show", "n0").stdout)
    nsutil.ip_batch(
        lab.client, [f"neigh replace {VIP} lladdr {node_mac[0]['address']} dev c0 nud permanent"]
    )
    dp = Dataplane(SPEC1, lab.nft)
    part = CONTIGUOUS
    flows = sorted(predicted(random_flows(random.Random(8), 400, [80], POOL), VIP, FOUR, part))
    a, b, c = flows[:3]
    dp.install({"web": GroupBuckets(draining=part)})
    assert tcp_round(lab, dp, [a], set()) == set()  # a new connection is not taken
    assert udp_round(lab, dp, "web", VIP, [b]) == {b}
    dp.update({"web": GroupBuckets(incoming=part)})
    assert tcp_round(lab, dp, [a], {a}) == {a}
    assert udp_round(lab, dp, "web", VIP, [c]) == set()
    dp.update({"web": GroupBuckets(owned=frozenset(range(B)) - part)})
    assert udp_round(lab, dp, "web", VIP, [c]) == set()  # not served: dropped as before


_UNIT_MS = {"d": 86_400_000, "h": 3_600_000, "m": 60_000, "s": 1000, "ms": 1}


def _lease_elements(dp: Dataplane) -> dict[str, int | None]:
    """The lease set as the kernel holds it: key -> timeout in ms (None: no expiry).  From
    the text listing: ``nft -j`` rounds timeouts down to whole seconds."""
    text = dp.nft.run(f"list set inet {dp.spec.table} lease")
    found = re.search(r"elements = [{]([^}]*)[}]", text)
    out: dict[str, int | None] = {}
    for element in found.group(1).split(",") if found else []:
        m = re.match(r"[ \t\n]*([a-z0-9]+)(?: timeout ([0-9a-z]+))?", element)
        assert m is not None, text
        parts = re.findall(r"([0-9]+)(ms|d|h|m|s)", m.group(2) or "")
        out[m.group(1)] = sum(int(n) * _UNIT_MS[u] for n, u in parts) if m.group(2) else None
    return out


@pytest.mark.parametrize("fast_path", [True, False], ids=["netlink", "libnftables"])
def test_lease_is_a_dead_man_switch_for_new_flows(lab: Lab, fast_path: bool) -> None:
    """Without the lease the node takes no new flow (owned or incoming) but keeps its
    established ones; a lease with an expiry lapses in the kernel by itself.  Written as a
    raw netlink batch (the renewal path) or through libnftables: the same kernel state."""
    dp = Dataplane(SPEC1, lab.nft, fast_path=fast_path)
    part = CONTIGUOUS
    dp.install({"web": GroupBuckets(owned=part)})
    assert dp.lease_held()
    assert _lease_elements(dp) == {"ipv4": None, "ipv6": None}
    rng = random.Random(11)
    (a,) = sorted(predicted(random_flows(rng, 400, [80], POOL), VIP, FOUR, part))[:1]
    new = sorted(predicted(random_flows(rng, 400, [81], POOL), VIP, FOUR, part))[:5]
    (u,) = sorted(predicted(random_flows(rng, 400, [82], POOL), VIP, FOUR, part))[:1]
    with established(lab, a) as (conn, served):
        dp.set_lease(0)
        assert not dp.lease_held()
        conn.sendall(b"established")
        assert served.recv(100) == b"established"  # established TCP goes on
        assert tcp_round(lab, dp, [new[0]], set()) == set()  # no new TCP (owned)
        assert udp_round(lab, dp, "web", VIP, [u]) == set()  # no new UDP either
        dp.update({"web": GroupBuckets(incoming=part)})
        assert tcp_round(lab, dp, [new[1]], set()) == set()  # nor a SYN in 'incoming'

        assert _lease_elements(dp) == {}
        dp.set_lease(None)
        assert _lease_elements(dp) == {"ipv4": None, "ipv6": None}
        assert tcp_round(lab, dp, [new[2]], {new[2]}) == {new[2]}
        dp.update({"web": GroupBuckets(owned=part)})
        dp.set_lease(61_500)
        assert _lease_elements(dp) == {"ipv4": 61_500, "ipv6": 61_500}
        dp.set_lease(400)
        assert _lease_elements(dp) == {"ipv4": 400, "ipv6": 400}
        assert tcp_round(lab, dp, [new[3]], {new[3]}) == {new[3]}
        nsutil.wait_until(lambda: not dp.lease_held(), 5.0, 0.02, "the kernel lease to expire")
        assert tcp_round(lab, dp, [new[4]], set()) == set()  # lapsed without any update
        conn.sendall(b"still")
        assert served.recv(100) == b"still"
    assert dp.fast_path is fast_path  # the netlink path was taken, no fallback
