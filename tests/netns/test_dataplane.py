"""The nft data plane in real namespaces: kernel bucket == flowhash model, flow by flow.

Per test: ``client`` (c0 198.18.0.2/24, sources 198.18.2.x/32) and ``node`` (n0 198.18.0.1/24,
traffic IPs on lo via HostSetup).  The client sends to the traffic IPs with the cluster's
*multicast* MAC (static neighbour), so the node gets L2 multicast as in a cluster.  IPv6 uses
the kernel's link-local addresses (nothing outside 198.18.0.0/15 is configured).  No sleeps.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import random
import re
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol

import pytest

from multihost.assignment import assign
from multihost.dataplane.backend import Backend
from multihost.dataplane.conntrack import dump_entries
from multihost.dataplane.hostsetup import HostSetup, HostSetupError, multicast_memberships
from multihost.dataplane.nft import Dataplane, Nft, NftError, netns_entered
from multihost.dataplane.ruleset import GroupBuckets, GroupSpec, RulesetSpec
from multihost.dataplane.rulesetdelta import Delta
from multihost.dataplane.rulesettables import render_guard_table
from multihost.dataplane.xdp import XdpDataplane
from multihost.flowhash import Flow, HashMode, IPAddress, flow_bucket
from multihost.macaddr import format_mac, multicast_mac
from tests.netns import nsutil

ip4 = ipaddress.IPv4Address
B = 40320
SEED = 0x5EED1234
GROUP = ip4("239.192.0.1")
GROUP_MAC = format_mac(multicast_mac(GROUP))
VIP = ip4("198.18.1.100")  # group "web", 4-tuple
VIP3 = ip4("198.18.1.101")  # group "tri", 3-tuple
VIPS = ip4("198.18.1.102")  # group "src", source-ip
CLIENT = ip4("198.18.0.2")
NODE = ip4("198.18.0.1")
POOL = [ip4(f"198.18.2.{i}") for i in range(1, 65)]
SCATTERED = assign({0, 1}).buckets(0)  # 2 of 8 live: 20160 buckets in ~2000 ranges
CONTIGUOUS = frozenset(range(5040, 10080))  # slot 1 with all 8 live: one range
FlowT = nsutil.FlowT
WEB = GroupSpec("web", (VIP,))
SPEC1 = RulesetSpec(B, SEED, (WEB,))
TRI, SRC = (
    GroupSpec("tri", (VIP3,), HashMode.THREE_TUPLE),
    GroupSpec("src", (VIPS,), HashMode.SOURCE_IP),
)
SPEC3 = RulesetSpec(B, SEED, (WEB, TRI, SRC))
FOUR = HashMode.FOUR_TUPLE
MakeDp = Callable[[RulesetSpec], Backend]


@dataclass
class Lab:
    client: str
    node: str
    nft: Nft


def make_lab(ns: dict[str, str]) -> Lab:
    client, node = ns["client"], ns["node"]
    nsutil.client_node(client, node, f"{CLIENT}/24", f"{NODE}/24", POOL)
    mac = [f"neigh replace {v} lladdr {GROUP_MAC} dev c0 nud permanent" for v in (VIP, VIP3, VIPS)]
    nsutil.ip_batch(client, ["route add 198.18.1.0/24 dev c0", *mac])  # via the multicast MAC
    return Lab(client, node, Nft(netns=node))


@pytest.fixture
def lab() -> Iterator[Lab]:
    nsutil.cleanup_stale()
    with nsutil.netns_group("client", "node") as ns:
        lab = make_lab(ns)
        host = HostSetup("n0", [VIP, VIP3, VIPS], GROUP, netns=lab.node)
        try:
            host.apply()
            yield lab
        finally:
            lab.nft.close()
            host.restore()


@pytest.fixture(params=["nft", "xdp"])
def make_dp(
    request: pytest.FixtureRequest, lab: Lab, bpf_root: Path
) -> Iterator[Callable[[RulesetSpec], Backend]]:
    """A data plane of either backend on the node (tests that hold for both)."""
    made: list[Backend] = []

    def make(spec: RulesetSpec) -> Backend:
        dp: Backend
        if request.param == "nft":
            dp = Dataplane(spec, lab.nft)
        else:
            dp = XdpDataplane(spec, "n0", bpf_root / f"{lab.node}-pins", netns=lab.node)
        made.append(dp)
        return dp

    yield make
    for dp in made:
        if dp.backend == "xdp":
            dp.remove()


def owning(buckets: frozenset[int]) -> dict[str, GroupBuckets]:
    return {g: GroupBuckets(owned=buckets) for g in ("web", "tri", "src")}


def predicted(
    flows: list[FlowT], vip: IPAddress, mode: HashMode, owned: frozenset[int], proto: str = "udp"
) -> set[FlowT]:
    return {
        f for f in flows if flow_bucket(Flow(f[0], f[1], vip, f[2], proto), B, SEED, mode) in owned
    }


def random_flows(
    rng: random.Random, n: int, dports: list[int], sources: Sequence[IPAddress]
) -> list[FlowT]:
    return [
        (rng.choice(sources), p, rng.choice(dports)) for p in rng.sample(range(20000, 60000), n)
    ]


def counter(dp: Backend, group: str) -> nsutil.Counter:
    def read() -> tuple[int, int]:
        c = dp.counters()[group]
        # per datagram, as nft counts reassembled ones: XDP also counts later fragments
        later = c.get("xdp_frag_passed_packets", 0), c.get("xdp_frag_dropped_packets", 0)
        return c["accepted_packets"] - later[0], c["dropped_packets"] - later[1]

    return read


def udp_round(
    lab: Lab, dp: Backend, group: str, vip: IPAddress, flows: list[FlowT], **kw: int
) -> set[FlowT]:
    return nsutil.udp_round(lab.client, lab.node, counter(dp, group), vip, flows, **kw)


def tcp_round(lab: Lab, dp: Backend, flows: list[FlowT], owned: set[FlowT]) -> set[FlowT]:
    return nsutil.tcp_round(lab.client, lab.node, counter(dp, "web"), VIP, flows, owned=owned)


class Ends(Protocol):
    """A client namespace and a node namespace (a :class:`Lab` or any other pair)."""

    client: str
    node: str


@contextlib.contextmanager
def established(lab: Ends, flow: FlowT) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A TCP connection of ``flow`` (port 80) from the client to the node: (client, server)."""
    listener = nsutil.socket_in(lab.node, socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((str(VIP), 80))
    listener.listen(64)
    conn = nsutil.socket_in(lab.client, socket.AF_INET, socket.SOCK_STREAM)
    try:
        with netns_entered(lab.client):
            conn.bind((str(flow[0]), flow[1]))
        conn.settimeout(5)
        conn.connect((str(VIP), 80))
        served, _ = listener.accept()
        with served:
            served.settimeout(5)
            yield conn, served
    finally:
        conn.close()
        listener.close()


# ----------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("owned", [SCATTERED, CONTIGUOUS], ids=["scattered", "contiguous"])
def test_kernel_bucket_matches_model_udp(lab: Lab, owned: frozenset[int], make_dp: MakeDp) -> None:
    dp = make_dp(SPEC3)
    dp.install(owning(owned))
    rng = random.Random(1)
    cases: list[tuple[str, IPAddress, HashMode, list[FlowT]]] = [
        ("web", VIP, HashMode.FOUR_TUPLE, random_flows(rng, 1500, [80], [CLIENT])),
        ("tri", VIP3, HashMode.THREE_TUPLE, random_flows(rng, 300, list(range(5000, 5016)), POOL)),
        ("src", VIPS, HashMode.SOURCE_IP, [(a, 40000 + i, 53) for i, a in enumerate(POOL)]),
    ]
    for group, vip, mode, flows in cases:
        want = predicted(flows, vip, mode, owned)
        got = udp_round(lab, dp, group, vip, flows)
        assert got == want, f"{group}: {len(got ^ want)} of {len(flows)} flows disagree"
        assert 0 < len(want) < len(flows)
        print(f"{group} ({mode}): {len(flows)} flows, {len(want)} owned, kernel == model")


def test_kernel_bucket_matches_model_tcp(lab: Lab, make_dp: MakeDp) -> None:
    dp = make_dp(SPEC3)
    dp.install(owning(SCATTERED))
    flows = random_flows(random.Random(2), 160, [80], POOL)
    want = predicted(flows, VIP, HashMode.FOUR_TUPLE, SCATTERED, "tcp")
    got = tcp_round(lab, dp, flows, want)
    assert got == want
    assert 0 < len(want) < len(flows)


def test_only_served_flows_reach_conntrack(lab: Lab) -> None:
    """Packets of buckets this node does not serve are dropped before conntrack."""
    dp = Dataplane(SPEC3, lab.nft)
    dp.install(owning(SCATTERED))
    flows = random_flows(random.Random(7), 300, [80], [CLIENT])
    want = predicted(flows, VIP, HashMode.FOUR_TUPLE, SCATTERED)
    before = dp.counters()["web"]
    assert udp_round(lab, dp, "web", VIP, flows) == want
    after = dp.counters()["web"]
    assert after["accepted_packets"] - before["accepted_packets"] == len(want)
    assert after["dropped_packets"] - before["dropped_packets"] == len(flows) - len(want)
    assert after["accepted_bytes"] - before["accepted_bytes"] == len(want) * (20 + 8 + 32)
    with netns_entered(lab.node):
        entries = dump_entries()
    tracked = {(ip4(e[0]), e[1], e[3]) for e in entries if e[2] == str(VIP) and e[4] == 17}
    assert tracked == want


def test_icmp_echo_by_address_hash_and_errors_to_every_node(lab: Lab, make_dp: MakeDp) -> None:
    dp = make_dp(SPEC3)
    dp.install(owning(SCATTERED))
    bucket = {a: flow_bucket(Flow(a, 0, VIP, 0, "icmp"), B, SEED) for a in POOL}
    want = {a for a in POOL if bucket[a] in SCATTERED}
    assert 0 < len(want) < len(POOL)
    assert nsutil.echo_round(lab.client, counter(dp, "web"), VIP, POOL) == want
    # an ICMP error from a source whose address hash is not owned is still delivered
    src = next(a for a in POOL if a not in want)
    inner = bytes.fromhex("4500001c00000000401100000000000000000000") + bytes(8)
    before = counter(dp, "web")()
    nsutil.icmp_send(lab.client, src, VIP, (3, 4), bytes(4) + inner)  # frag needed
    nsutil.wait_until(lambda: sum(counter(dp, "web")()) > sum(before), what="the ICMP error")
    assert counter(dp, "web")() == (before[0] + 1, before[1])


def test_fragmented_datagrams_are_taken_whole_by_the_owner(lab: Lab, make_dp: MakeDp) -> None:
    """3,000-byte datagrams over a 1,500-byte MTU: nft hashes the reassembled datagram, XDP
    decides each fragment by its first fragment's verdict -- the same flows either way."""
    dp = make_dp(SPEC3)
    dp.install(owning(SCATTERED))
    flows = random_flows(random.Random(3), 60, [80], [CLIENT])
    want = predicted(flows, VIP, HashMode.FOUR_TUPLE, SCATTERED)
    assert 0 < len(want) < len(flows)
    assert udp_round(lab, dp, "web", VIP, flows, size=3000) == want


def test_guard_table_alone_turns_on_defragmentation(lab: Lab) -> None:
    """A probe at -300 counts fragments; once the guard exists it only sees whole datagrams."""
    probe = (
        "table inet mhtA_probe {\n\tcounter frags {\n\t}\n\tcounter seen {\n\t}\n\tchain c {\n"
        "\t\ttype filter hook prerouting priority -300; policy accept;\n"
        '\t\tip daddr 198.18.1.100 ip frag-off & 0x3fff != 0 counter name "frags"\n'
        '\t\tip daddr 198.18.1.100 counter name "seen"\n\t}\n}\n'
    )
    lab.nft.run(probe)

    def probe_counts() -> tuple[int, int]:
        items = lab.nft.run_json("list counters table inet mhtA_probe")
        found = {i["counter"]["name"]: int(i["counter"]["packets"]) for i in items}
        return found["frags"], found["seen"]

    def send_big(sport: int) -> None:
        with netns_entered(lab.client), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.IPPROTO_IP, nsutil.IP_MTU_DISCOVER, nsutil.IP_PMTUDISC_DONT)
            s.bind((str(CLIENT), sport))
            s.sendto(bytes(3000), (str(VIP), 9))

    send_big(41000)  # no conntrack user in this netns yet: fragments reach -300
    nsutil.wait_until(lambda: probe_counts()[1] >= 3, what="three fragments at the probe")
    assert probe_counts() == (3, 3)
    lab.nft.run(render_guard_table(SPEC3))
    send_big(41001)
    nsutil.wait_until(lambda: probe_counts()[1] >= 4, what="the datagram at the probe")
    assert probe_counts() == (3, 4), "the guard's ct rule must make -300 see reassembled packets"


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


@pytest.mark.parametrize("fast_path", [True, False], ids=["netlink", "json"])
def test_update_is_one_exact_transaction(lab: Lab, fast_path: bool) -> None:
    dp = Dataplane(SPEC1, lab.nft, fast_path=fast_path)
    live = {n: assign(set(range(n))) for n in (1, 2, 3, 8)}
    states = {n: {"web": GroupBuckets(owned=a.buckets(0))} for n, a in live.items()}
    seconds = dp.install(states[2])
    print(f"install 20160 elements: {seconds * 1000:.1f} ms")
    assert dp.read_state() == states[2]
    assert not dp.update(states[2]).changed  # no-op
    for n_from, n_to in ((2, 3), (3, 2), (2, 1), (1, 8), (8, 2)):
        dp.update(states[n_from])
        stats = dp.update(states[n_to])
        assert stats.path == ("netlink" if fast_path else "json")
        print(
            f"{n_from}->{n_to} of 8: +{stats.added} -{stats.removed} via {stats.path}: "
            f"render {stats.render_seconds * 1000:.1f} ms apply {stats.apply_seconds * 1000:.1f} ms"
        )
        assert dp.read_state() == states[n_to]
    # handover shapes: owned -> draining -> incoming -> owned, with a disjoint rest owned
    cur = states[2]["web"].owned
    half = frozenset(sorted(cur)[::2])
    for gb in (
        GroupBuckets(owned=cur - half, draining=half),
        GroupBuckets(owned=cur - half, incoming=half),
        GroupBuckets(draining=cur - half, incoming=half),
        GroupBuckets(owned=cur),
    ):
        dp.update({"web": gb})
        assert dp.read_state() == {"web": gb}
    # a refused transaction changes nothing, on either path
    with pytest.raises(NftError):
        lab.nft.run(
            "add element inet multihost web_buckets { 7 : host }\n"
            "delete element inet multihost web_handover { 99999 }\n"
        )
    bad = Delta(
        removed={"web_handover": (99999,)}, added={("web_buckets", "host"): tuple(range(7000))}
    )
    with pytest.raises(NftError) as refused:
        lab.nft.send_elements("multihost", bad)
    assert refused.value.code == errno.ENOENT
    assert dp.read_state() == {"web": GroupBuckets(owned=cur)}
    assert dp.update({"web": GroupBuckets(owned=cur - {min(cur)})}).changed  # still in step


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


def test_ipv6_kernel_bucket_matches_model_and_nd_passes(lab: Lab) -> None:
    node_ll, _ = nsutil.link_local(lab.node, "n0")
    client_ll, c0 = nsutil.link_local(lab.client, "c0")
    spec = RulesetSpec(B, SEED, (GroupSpec("six", (node_ll,)),))
    nd_bucket = flow_bucket(Flow(client_ll, 0, node_ll, 0, "icmpv6"), B, SEED)
    owned = SCATTERED - {nd_bucket}  # ND would be dropped if it were hashed
    dp = Dataplane(spec, lab.nft)
    dp.install({"six": GroupBuckets(owned=owned)})
    flows = random_flows(random.Random(6), 400, [80], [client_ll])
    want = predicted(flows, node_ll, HashMode.FOUR_TUPLE, owned)
    assert 0 < len(want) < len(flows)
    assert udp_round(lab, dp, "six", node_ll, flows, scope=c0) == want

    # A unicast neighbour solicitation to the traffic IP must be answered.
    link = json.loads(nsutil.ns_run(lab.node, "ip", "-j", "link", "show", "n0").stdout)
    nsutil.sysctl(lab.client, "net.ipv6.neigh.c0.delay_first_probe_time", "0")
    stale = f"neigh replace {node_ll} lladdr {link[0]['address']} dev c0 nud stale"
    nsutil.ip_batch(lab.client, [stale])
    before = dp.counters()["six"]["accepted_packets"]
    with netns_entered(lab.client), socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.sendto(b"wake", (str(node_ll), 9, 0, c0))  # STALE -> DELAY -> PROBE (unicast NS)

    def reachable() -> bool:
        out = nsutil.ns_run(
            lab.client, "ip", "-6", "neigh", "show", str(node_ll), "dev", "c0"
        ).stdout
        assert "FAILED" not in out, out
        return "REACHABLE" in out

    nsutil.wait_until(reachable, what="neighbour entry REACHABLE after a unicast probe")
    assert dp.counters()["six"]["accepted_packets"] > before  # the NS went through the filter


def test_install_remove_and_close(lab: Lab) -> None:
    def nft(*args: str) -> str:
        return nsutil.ns_run(lab.node, "nft", *args).stdout

    nft("add", "table", "inet", "multihost")  # stale and not owner-flagged: taken over
    dp = Dataplane(SPEC3, lab.nft)
    dp.install(owning(CONTIGUOUS))
    assert "flags owner" in nft("list", "table", "inet", "multihost")
    dp.remove()
    dp.remove()  # idempotent
    assert nft("list", "tables") == ""
    other = Nft(netns=lab.node)
    mine = Dataplane(SPEC3, other)
    mine.install(owning(CONTIGUOUS))
    assert mine.update(owning(SCATTERED)).path == "netlink"  # uses a dup of its socket
    other.close()  # frees its context: the owned table goes, the guard stays
    assert nft("list", "tables") == "table inet multihost_guard\n"


# ------------------------------------------------------------------------------ host setup


def test_hostsetup_apply_restore_round_trip() -> None:
    nsutil.cleanup_stale()
    with nsutil.netns_group("peer", "node") as ns:
        node = ns["node"]
        nsutil.veth(ns["peer"], "p0", node, "n0")
        nsutil.sysctl(node, "net.ipv4.conf.n0.arp_announce", "1")
        nsutil.sysctl(node, "net.ipv6.conf.n0.drop_unicast_in_l2_multicast", "1")
        nsutil.run("ip", "-n", node, "addr", "add", "198.18.1.11/32", "dev", "lo")
        keys = {
            "net.ipv4.conf.n0.arp_ignore": ("0", "1"),
            "net.ipv4.conf.n0.arp_announce": ("1", "2"),
            "net.ipv6.conf.n0.drop_unicast_in_l2_multicast": ("1", "0"),
        }
        addrs_before = nsutil.addresses(node, "lo")
        mcast_before = multicast_memberships("n0", netns=node)
        assert GROUP_MAC not in mcast_before
        vips: list[IPAddress] = [
            ip4("198.18.1.10"),
            ip4("198.18.1.11"),
            ipaddress.IPv6Address("fe80::c612:10a"),
        ]
        host = HostSetup("n0", vips, GROUP, netns=node)
        host.apply()
        host.apply()  # idempotent
        try:
            assert {k: nsutil.sysctl_get(node, k) for k in keys} == {
                k: v[1] for k, v in keys.items()
            }
            lo = nsutil.addresses(node, "lo")
            assert {"198.18.1.10/32", "198.18.1.11/32", "fe80::c612:10a/128"} <= lo
            assert host.added_addresses == (vips[0], vips[2])
            nodad = nsutil.ns_run(node, "ip", "-6", "addr", "show", "dev", "lo").stdout
            assert "fe80::c612:10a/128 scope link nodad" in nodad
            assert GROUP_MAC in multicast_memberships("n0", netns=node) - mcast_before
            maddr = nsutil.ns_run(node, "ip", "maddr", "show", "dev", "n0").stdout
            assert str(GROUP) in maddr
        finally:
            host.restore()
        host.restore()  # idempotent
        assert {k: nsutil.sysctl_get(node, k) for k in keys} == {k: v[0] for k, v in keys.items()}
        assert nsutil.addresses(node, "lo") == addrs_before
        assert GROUP_MAC not in multicast_memberships("n0", netns=node)
        assert str(GROUP) not in nsutil.ns_run(node, "ip", "maddr", "show", "dev", "n0").stdout

        # a traffic IP on the cluster interface is refused, and nothing is left changed
        nsutil.run("ip", "-n", node, "addr", "add", "198.18.1.12/32", "dev", "n0")
        bad = HostSetup("n0", [ip4("198.18.1.13"), ip4("198.18.1.12")], GROUP, netns=node)
        with pytest.raises(HostSetupError, match=r"198\.18\.1\.12"):
            bad.apply()
        assert {k: nsutil.sysctl_get(node, k) for k in keys} == {k: v[0] for k, v in keys.items()}
        assert nsutil.addresses(node, "lo") == addrs_before


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
