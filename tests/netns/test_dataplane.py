"""The nft data plane in real namespaces: kernel bucket == flowhash model, flow by flow.

Owns: classification (UDP, TCP, ICMP, fragments, IPv6 and ND, on both backends where the
test holds for both), what reaches conntrack, the guard table's defragmentation, and the
owned table's life cycle (install, one exact transaction per update, remove, close).  The
lab (tests/netns/nsutil_dp.py, fixtures in conftest.py): ``client`` and ``node``, traffic
sent with the cluster's multicast MAC.  Handover, lease and fail-closed behaviour are in
``test_dataplane_handover.py``; the host setup in ``test_dataplane_hostsetup.py``.  No sleeps.
"""

from __future__ import annotations

import errno
import json
import random
import socket

import pytest

from multihost.assignment import assign
from multihost.dataplane.conntrack import dump_entries
from multihost.dataplane.nft import Dataplane, Nft, NftError, netns_entered
from multihost.dataplane.ruleset import GroupBuckets, GroupSpec, RulesetSpec
from multihost.dataplane.rulesetdelta import Delta
from multihost.dataplane.rulesettables import render_guard_table
from multihost.flowhash import Flow, HashMode, IPAddress, flow_bucket
from tests.netns import nsutil
from tests.netns.nsutil_dp import (
    CLIENT,
    CONTIGUOUS,
    POOL,
    SCATTERED,
    SEED,
    SPEC1,
    SPEC3,
    VIP,
    VIP3,
    VIPS,
    B,
    FlowT,
    Lab,
    MakeDp,
    counter,
    ip4,
    owning,
    predicted,
    random_flows,
    tcp_round,
    udp_round,
)


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
