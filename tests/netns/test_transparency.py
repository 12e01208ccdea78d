"""IP transparency on the nodes with real packets: the multi-hosted return gateway.

Three nodes and a back end on one bridge (the back-end network).  The back end's default
gateway is the return group's address, resolved to the cluster MAC, so each of its replies
reaches every node.  On every node a transparent UDP socket stands for a proxy's connection
from the client's address and port to the back end (``IP_TRANSPARENT``, bound to the
client's address: not local), and the node runs the data plane (both backends) and the host
setup with the transparent-proxy plumbing (``socket transparent`` mark, fwmark rule, local
route).  Every reply must be delivered to exactly one socket: the one on the node that owns
the *request's* bucket (front group hash on the client's address and port).  When a node
fails and its buckets move, its replies move with them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import random
import resource
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from multihost.config import Config
from multihost.dataplane.backend import Backend
from multihost.dataplane.hostsetup import HostSetup
from multihost.dataplane.nft import Dataplane, Nft, netns_entered
from multihost.dataplane.ruleset import GroupBuckets, GroupSpec, ReturnSpec, RulesetSpec
from multihost.dataplane.transparent import TransparentSetup
from multihost.dataplane.xdp import XdpDataplane
from multihost.flowhash import RETURN_MODES, Flow, HashMode, flow_bucket
from tests.netns import nsutil

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
B, SEED = 40320, 0x7EED1234
VIP = ipaddress.IPv4Address("198.18.0.100")
GW = ipaddress.IPv4Address("198.19.0.1")
BACKEND = "198.19.0.9"
GROUP = ipaddress.IPv4Address("239.192.0.1")
GROUP_MAC = "01:00:5e:40:00:01"
MARK, TABLE, PRIO = 0x4D48, 4248, 4248
NODES = ("n1", "n2", "n3")
FLOWS = 300
IP_TRANSPARENT = 19
#: The cluster (client-facing) interface: a veth pair of the node's own (no clients here).
FRONT_LINK = ("link add f0 type veth peer name f1", "link set f0 up", "link set f1 up")


IPV6_TRANSPARENT = 75


@dataclass(frozen=True)
class Net:
    """The addresses of one family's test network."""

    family: int
    vip: IPAddress
    gw: IPAddress
    backend: str
    group: IPAddress
    mac: str
    plen: int

    def node_addr(self, i: int) -> str:
        return f"198.19.0.1{i}" if self.family == 4 else f"2001:db8:1::1{i}"

    def client(self, i: int) -> IPAddress:
        return ipaddress.ip_address(f"198.18.5.{i}" if self.family == 4 else f"2001:db8:5::{i}")


NET4 = Net(4, VIP, GW, BACKEND, GROUP, GROUP_MAC, 24)
NET6 = Net(
    6,
    ipaddress.ip_address("2001:db8::100"),
    ipaddress.ip_address("2001:db8:1::1"),
    "2001:db8:1::9",
    ipaddress.ip_address("ff15::1"),
    "33:33:00:00:00:01",
    64,
)


def spec(mode: HashMode, net: Net = NET4) -> RulesetSpec:
    macs = ((net.family, net.mac),)
    ret = ReturnSpec("web_ret", "web", (net.gw,), "b0", RETURN_MODES[mode], macs)
    return RulesetSpec(B, SEED, (GroupSpec("web", (net.vip,), mode),), returns=(ret,))


def state(node: str, live: tuple[str, ...]) -> dict[str, GroupBuckets]:
    """Bucket b belongs to live[b % len(live)]."""
    mine = frozenset(b for b in range(B) if live[b % len(live)] == node)
    return {"web": GroupBuckets(owned=mine)}


def owner(
    mode: HashMode, client: IPAddress, cport: int, live: tuple[str, ...], net: Net = NET4
) -> str:
    bucket = flow_bucket(Flow(client, cport, net.vip, 80, "udp"), B, SEED, mode)
    return live[bucket % len(live)]


def _snapshot(ns: str) -> dict[str, list[str]]:
    return _snapshot_on(ns, "b0")


def _snapshot_on(ns: str, iface: str) -> dict[str, list[str]]:
    """What the host setup with transparency may touch, as sorted lines of text."""
    text = {
        "rules4": nsutil.ns_run(ns, "ip", "-4", "rule").stdout,
        "rules6": nsutil.ns_run(ns, "ip", "-6", "rule").stdout,
        "routes4": nsutil.ns_run(ns, "ip", "-4", "route", "show", "table", "all").stdout,
        "routes6": nsutil.ns_run(ns, "ip", "-6", "route", "show", "table", "all").stdout,
        "nft": nsutil.ns_run(ns, "nft", "list", "ruleset").stdout,
        "addr_lo": nsutil.ns_run(ns, "ip", "addr", "show", "dev", "lo").stdout,
        "maddr_b0": nsutil.ns_run(ns, "ip", "maddr", "show", "dev", iface).stdout,
        "sysctl_b0": nsutil.ns_run(
            ns, "sysctl", f"net.ipv4.conf.{iface}.arp_ignore", f"net.ipv4.conf.{iface}.arp_announce"
        ).stdout,
    }
    return {k: sorted(v.splitlines()) for k, v in text.items()}


def test_host_setup_with_transparency_restores_the_host_exactly() -> None:
    nsutil.cleanup_stale()
    with nsutil.netns_group("peer", "node") as ns:
        node = ns["node"]
        nsutil.sysctl(node, "net.ipv6.conf.default.accept_dad", "0")
        nsutil.veth(ns["peer"], "p0", node, "b0")
        nsutil.ip_batch(node, [*FRONT_LINK])
        for iface in ("b0", "f0", "f1"):  # IPv6 link-local routes and groups settled
            nsutil.link_local(node, iface)
        nsutil.run("ip", "-n", node, "rule", "add", "fwmark", "7", "lookup", "77", "prio", "77")
        before = _snapshot(node)
        t = TransparentSetup(MARK, TABLE, PRIO, [4, 6], netns=node)
        host = HostSetup("f0", [VIP, GW], GROUP, netns=node, extra_interfaces=["b0"], transparent=t)
        host.apply()
        try:
            during = _snapshot(node)
            for fam in ("4", "6"):
                rule = f"{PRIO}:\tfrom all fwmark {MARK:#x} lookup {TABLE}"
                assert rule in during[f"rules{fam}"]
                local = f"local default dev lo table {TABLE} "
                assert any(r.startswith(local) for r in during[f"routes{fam}"])
            nft = "\n".join(during["nft"])
            assert f"socket transparent 1 meta mark set {MARK:#010x}" in nft
            assert any(GROUP_MAC in line for line in during["maddr_b0"])  # cluster MAC
            assert "net.ipv4.conf.b0.arp_ignore = 1" in during["sysctl_b0"]
        finally:
            host.restore()
        host.restore()  # idempotent
        assert _snapshot(node) == before

        # a routing table someone else uses is refused, and nothing is left changed
        nsutil.run("ip", "-n", node, "route", "add", "198.18.9.0/24", "dev", "f0", "table", "4249")
        bad = HostSetup(
            "f0",
            [VIP],
            GROUP,
            netns=node,
            transparent=TransparentSetup(MARK, 4249, PRIO, [4], netns=node),
        )
        before = _snapshot(node)
        with pytest.raises(Exception, match="routing table 4249 already holds"):
            bad.apply()
        assert _snapshot(node) == before


@contextlib.contextmanager
def _network(
    backend: str, bpf_root: Path, mode: HashMode, net: Net = NET4
) -> Iterator[tuple[str, dict[str, str], dict[str, Backend]]]:
    nsutil.cleanup_stale()
    with nsutil.netns_group("sw", "be", *NODES) as ns:
        sw = ns["sw"]
        for role in ("be", *NODES):
            nsutil.sysctl(ns[role], "net.ipv6.conf.default.accept_dad", "0")
        nsutil.ip_batch(sw, ["link add br0 type bridge mcast_snooping 0", "link set br0 up"])
        for i, role in enumerate(("be", *NODES)):
            nsutil.veth(ns[role], "b0", sw, f"p{i}")
            nsutil.run("ip", "-n", sw, "link", "set", f"p{i}", "master", "br0")
        nsutil.ip_batch(
            ns["be"],
            [
                f"addr add {net.backend}/{net.plen} dev b0",
                f"route add default via {net.gw}",
                f"neigh replace {net.gw} lladdr {net.mac} dev b0 nud permanent",
            ],
        )
        hosts: list[HostSetup] = []
        planes: dict[str, Backend] = {}
        nfts: list[Nft] = []
        try:
            for i, role in enumerate(NODES):
                node = ns[role]
                nsutil.ip_batch(
                    node,
                    [*FRONT_LINK, f"addr add {net.node_addr(i)}/{net.plen} dev b0"],
                )
                t = TransparentSetup(MARK, TABLE, PRIO, [net.family], netns=node)
                host = HostSetup(
                    "f0",
                    [net.vip, net.gw],
                    net.group,
                    netns=node,
                    extra_interfaces=["b0"],
                    transparent=t,
                )
                host.apply()
                hosts.append(host)
                dp: Backend
                if backend == "nft":
                    nft = Nft(netns=node)
                    nfts.append(nft)
                    dp = Dataplane(spec(mode, net), nft)
                else:
                    pins = bpf_root / f"{node}-pins"
                    dp = XdpDataplane(spec(mode, net), "f0", pins, netns=node)
                dp.install(state(role, NODES))
                planes[role] = dp
            yield ns["be"], ns, planes
        finally:
            for dp in planes.values():
                with contextlib.suppress(Exception):
                    dp.remove()
                dp.close()
            for nft in nfts:
                nft.close()
            for host in hosts:
                host.restore()


def _transparent_socket(ns: str, client: str, cport: int, backend: str) -> socket.socket:
    v6 = ":" in client
    with netns_entered(ns):
        s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    if v6:
        s.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    s.setblocking(False)
    s.bind((client, cport))
    s.connect((backend, 53))
    return s


Counters = Callable[[str], dict[str, int]]  # node -> the return group's counters


def _plane_counters(planes: dict[str, Backend]) -> Counters:
    return lambda role: planes[role].counters()["web_ret"]


def _replies_round(
    be: str,
    ns: dict[str, str],
    counters: Counters,
    flows: list[tuple[IPAddress, int]],
    live: tuple[str, ...],
    *,
    backend: str = BACKEND,
) -> dict[tuple[IPAddress, int], list[str]]:
    """Send one reply per flow from the back end; who received each (by node)."""
    socks = {
        (role, f): _transparent_socket(ns[role], str(f[0]), f[1], backend)
        for role in live
        for f in flows
    }
    before = {r: counters(r) for r in live}
    try:
        with netns_entered(be):
            tx = socket.socket(
                socket.AF_INET6 if ":" in backend else socket.AF_INET, socket.SOCK_DGRAM
            )
        tx.bind((backend, 53))
        with tx:
            for c, p in flows:
                tx.sendto(f"reply {c}:{p}".encode(), (str(c), p))

        def seen(r: str) -> int:
            now = counters(r)
            return sum(now[k] - before[r][k] for k in ("accepted_packets", "dropped_packets"))

        nsutil.wait_until(
            lambda: all(seen(r) >= len(flows) for r in live),
            what="every node's return filter to see every reply",
        )
        accepted = sum(
            counters(r)["accepted_packets"] - before[r]["accepted_packets"] for r in live
        )
        got: dict[tuple[IPAddress, int], list[str]] = {f: [] for f in flows}

        def drain() -> int:
            for (role, f), s in socks.items():
                with contextlib.suppress(BlockingIOError):
                    while True:
                        data = s.recv(100)
                        assert data == f"reply {f[0]}:{f[1]}".encode()
                        got[f].append(role)
            return sum(len(v) for v in got.values())

        nsutil.wait_until(lambda: drain() >= accepted, what="accepted replies at the sockets")
        assert accepted == len(flows), f"{accepted} replies accepted for {len(flows)} sent"
        return got
    finally:
        for s in socks.values():
            s.close()


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("mode", list(RETURN_MODES))
def test_each_reply_reaches_exactly_the_owner_of_its_request(
    lab_backend: str, bpf_root: Path, mode: HashMode, family: int
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    net = NET4 if family == 4 else NET6
    rng = random.Random(f"transparent-{mode.value}-{family}")
    clients = [net.client(i) for i in range(1, 6)]
    flows = [(rng.choice(clients), p) for p in rng.sample(range(20000, 60000), FLOWS)]
    with _network(lab_backend, bpf_root, mode, net) as (be, ns, planes):
        got = _replies_round(be, ns, _plane_counters(planes), flows, NODES, backend=net.backend)
        want = {f: [owner(mode, f[0], f[1], NODES, net)] for f in flows}
        wrong = {f: (got[f], want[f]) for f in flows if got[f] != want[f]}
        assert not wrong, f"{len(wrong)} of {len(flows)} replies wrong: {list(wrong.items())[:3]}"
        assert {owners[0] for owners in got.values()} == set(NODES)  # all three served

        # n3 fails: its buckets move to n1 and n2 -- and its replies with them
        planes["n3"].remove()
        survivors = ("n1", "n2")
        for role in survivors:
            planes[role].update(state(role, survivors))
        got = _replies_round(be, ns, _plane_counters(planes), flows, survivors, backend=net.backend)
        want = {f: [owner(mode, f[0], f[1], survivors, net)] for f in flows}
        wrong = {f: (got[f], want[f]) for f in flows if got[f] != want[f]}
        assert not wrong, f"after the failure, {len(wrong)} wrong: {list(wrong.items())[:3]}"


# ------------------------------------------------------------------ the agents
AGENT_CONFIG = """
[cluster]
name = "tgw"
interface = "eth0"
multicast_group = "239.192.0.1"
key_file = "{key}"
dataplane = "{backend}"
bpf_pin_root = "{pins}"
realtime_priority = 0

[[node]]
name = "A"
address = "198.18.0.11"
slot = 0
[[node]]
name = "B"
address = "198.18.0.12"
slot = 1

[[traffic_ip_group]]
name = "web"
addresses = ["{vip}"]
members = ["A", "B"]
hash = "source-ip-port"
transparent = true
return = "gateway"

[[traffic_ip_group]]
name = "web_ret"
return_for = "web"
addresses = ["{gw}"]
interface = "eth1"
"""


def test_agents_answer_the_gateway_and_deliver_each_reply_to_the_owner(
    lab_backend: str, bpf_root: Path, tmp_path: Path
) -> None:
    """Two real agents (membership, heartbeats): the back end resolves its gateway by ARP
    to the cluster MAC on the back-end network, each reply reaches exactly the node that
    owns its request, and a clean stop leaves the node as it was."""
    import os
    import signal
    import subprocess
    import sys

    from multihost.config import parse_config
    from multihost.control import ControlError, request
    from multihost.ownership import targets

    key = tmp_path / "key"
    key.write_bytes(os.urandom(32).hex().encode())
    key.chmod(0o600)
    text = AGENT_CONFIG.format(
        key=key, backend=lab_backend, pins=bpf_root / "agents", vip=VIP, gw=GW
    )
    (tmp_path / "cluster.toml").write_text(text)
    cfg = parse_config(text)
    nsutil.cleanup_stale()
    with nsutil.netns_group("sw", "be", "A", "B") as ns:
        sw = ns["sw"]
        for role in ("A", "B"):
            nsutil.sysctl(ns[role], "net.ipv6.conf.default.accept_dad", "0")
        nsutil.ip_batch(
            sw,
            [
                "link add br0 type bridge mcast_snooping 0",
                "link add br1 type bridge mcast_snooping 0",
                "link set br0 up",
                "link set br1 up",
            ],
        )
        for i, role in enumerate(("A", "B")):
            nsutil.veth(ns[role], "eth0", sw, f"f{i}")
            nsutil.run("ip", "-n", sw, "link", "set", f"f{i}", "master", "br0")
            nsutil.ip_batch(ns[role], [f"addr add 198.18.0.1{i + 1}/24 dev eth0"])
        for i, role in enumerate(("be", "A", "B")):
            nsutil.veth(ns[role], "eth1", sw, f"b{i}")
            nsutil.run("ip", "-n", sw, "link", "set", f"b{i}", "master", "br1")
        nsutil.ip_batch(ns["A"], ["addr add 198.19.0.11/24 dev eth1"])
        nsutil.ip_batch(ns["B"], ["addr add 198.19.0.12/24 dev eth1"])
        nsutil.ip_batch(
            ns["be"], [f"addr add {BACKEND}/24 dev eth1", f"route add default via {GW}"]
        )
        for iface in ("eth0", "eth1"):  # IPv6 link-local routes and groups settled
            nsutil.link_local(ns["A"], iface)
        before = _snapshot_on(ns["A"], "eth1")
        procs: dict[str, subprocess.Popen[bytes]] = {}
        socks = {r: tmp_path / f"{r}.sock" for r in ("A", "B")}
        try:
            for role in ("A", "B"):
                cmd = ["ip", "netns", "exec", ns[role], sys.executable, "-m", "multihost"]
                cmd += ["agent", "--config", str(tmp_path / "cluster.toml"), "--node", role]
                procs[role] = subprocess.Popen(
                    [*cmd, "--control-socket", str(socks[role])],
                    stdout=subprocess.DEVNULL,
                    stderr=(tmp_path / f"{role}.log").open("wb"),
                )

            def serving() -> bool:
                try:
                    st = [request(socks[r], "status", timeout=1.0) for r in ("A", "B")]
                except (ControlError, OSError):
                    return False
                web = [s["groups"]["web"] for s in st]
                owned = sum(w["owned"]["buckets"] for w in web)
                # and no handover in flight: a new flow of a draining bucket is still the old
                # holder's, so the prediction below holds only once every move is done
                settled = all(w["draining"] == 0 and w["incoming"] == 0 for w in web)
                return all(s["live"] == ["A", "B"] for s in st) and owned == cfg.buckets and settled

            nsutil.wait_until(serving, timeout=20.0, interval=0.05, what="both agents serving")
            mine = {r: targets(cfg, r, ("A", "B"))["web"] for r in ("A", "B")}
            rng = random.Random(f"agents-{lab_backend}")
            client = ipaddress.IPv4Address("198.18.5.7")
            flows: list[tuple[IPAddress, int]] = [
                (client, p) for p in rng.sample(range(20000, 60000), 40)
            ]

            def status_counters(role: str) -> dict[str, int]:
                packets = request(socks[role], "status")["return_groups"]["web_ret"]["packets"]
                return dict(packets)

            got = _replies_round(ns["be"], ns, status_counters, flows, ("A", "B"))
            for f in flows:
                request_flow = Flow(f[0], f[1], VIP, 80, "udp")
                bucket = flow_bucket(
                    request_flow, cfg.buckets, cfg.cluster.hash_seed, HashMode.SOURCE_IP_PORT
                )
                want = [r for r in ("A", "B") if bucket in mine[r]]
                assert got[f] == want, (f, got[f], want)
            _tcp_through_the_gateway(ns, cfg, mine)
            neigh = nsutil.ns_run(ns["be"], "ip", "neigh", "show", str(GW)).stdout
            assert GROUP_MAC in neigh  # the agents answered ARP for the gateway on eth1
            st = request(socks["A"], "status")
            assert st["return_groups"]["web_ret"]["interface"] == "eth1"
        finally:
            for p in procs.values():
                p.send_signal(signal.SIGTERM)
            for p in procs.values():
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        assert all(p.returncode == 0 for p in procs.values()), [
            (tmp_path / f"{r}.log").read_text()[-2000:] for r in procs
        ]
        assert _snapshot_on(ns["A"], "eth1") == before


def _tcp_through_the_gateway(
    ns: dict[str, str], cfg: Config, mine: dict[str, frozenset[int]]
) -> None:
    """What a proxy does: connect to the back end from the client's address and port
    (``IP_TRANSPARENT``).  The handshake completes, and data comes back, exactly when the
    node owns the client's bucket: the SYN-ACK and the replies come through the gateway."""
    import threading

    with netns_entered(ns["be"]):
        server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((BACKEND, 8080))
    server.listen(64)
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, peer = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(f"hello {peer[0]}:{peer[1]}".encode())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = "198.18.6.9"
    ports = iter(range(30000, 60000))
    try:
        for role in ("A", "B"):
            for owned in (True, False):
                cport = next(
                    p
                    for p in ports
                    if (
                        flow_bucket(
                            Flow(ipaddress.IPv4Address(client), p, VIP, 80, "tcp"),
                            cfg.buckets,
                            cfg.cluster.hash_seed,
                            HashMode.SOURCE_IP_PORT,
                        )
                        in mine[role]
                    )
                    == owned
                )
                with netns_entered(ns[role]):
                    s = socket.socket()
                with s:
                    s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
                    s.bind((client, cport))
                    s.settimeout(1.5 if owned else 0.5)
                    if owned:
                        s.connect((BACKEND, 8080))
                        # the back end saw the client's real address and port
                        assert s.recv(100) == f"hello {client}:{cport}".encode(), role
                    else:
                        with pytest.raises(OSError):  # its SYN-ACK went to the owner
                            s.connect((BACKEND, 8080))
    finally:
        stop.set()
        thread.join()
        server.close()
