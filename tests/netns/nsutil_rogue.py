"""A rogue host on a lab's switch, for hostile-input tests (root).

Owns: :class:`Rogue` — a namespace named like a lab client (``<prefix>c8``, so
``multihost lab clean`` removes it even if a test dies) with a veth port in the lab's
switch bridge and the address 198.18.0.250; sockets opened inside it (to send forged or
replayed heartbeats, capture real ones, flood ARP); and :func:`arp_frame`.

Must not: touch a namespace or bridge that is not the given lab's.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import time

from multihost.dataplane.nft import netns_entered
from multihost.lab import agents
from multihost.lab.state import LabState

ROGUE_ADDR = "198.18.0.250"
ETH_P_ARP = 0x0806


class Rogue:
    """A host on the lab switch that is not a member: ``<prefix>c8``, 198.18.0.250."""

    def __init__(self, state: LabState) -> None:
        self.state = state
        self.netns = f"{state.prefix}c8"
        sw = state.topology.switch
        sh("ip", "netns", "add", self.netns)
        self.port = "p-rogue"
        ns = ["ip", "netns", "exec", sw.netns]
        sh(*ns, "ip", "link", "add", self.port, "type", "veth", "peer", "eth0", "netns", self.netns)
        sh(*ns, "ip", "link", "set", self.port, "master", sw.bridge, "up")
        rg = ["ip", "netns", "exec", self.netns]
        sh(*rg, "ip", "addr", "add", f"{ROGUE_ADDR}/16", "dev", "eth0")
        sh(*rg, "ip", "link", "set", "eth0", "up")
        sh(*rg, "ip", "link", "set", "lo", "up")

    def open_socket(self, family: int, kind: int, proto: int = 0) -> socket.socket:
        with netns_entered(self.netns):
            return socket.socket(family, kind, proto)

    def sender(self) -> socket.socket:
        s = self.open_socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(ROGUE_ADDR))
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        return s

    def capture(self, per_node: int, timeout: float = 10.0) -> dict[str, list[bytes]]:
        """Real heartbeats from the wire (a socket joined to the group), ``per_node`` each."""
        topo = self.state.topology
        s = self.open_socket(socket.AF_INET, socket.SOCK_DGRAM)
        got: dict[str, list[bytes]] = {n.address: [] for n in topo.nodes}
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((topo.group, agents.HEARTBEAT_PORT))
            mreq = struct.pack("4s4s", socket.inet_aton(topo.group), socket.inet_aton(ROGUE_ADDR))
            s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
            s.settimeout(0.2)
            deadline = time.monotonic() + timeout
            while any(len(v) < per_node for v in got.values()):
                assert time.monotonic() < deadline, f"captured only {got}"
                try:
                    data, (addr, _) = s.recvfrom(2048)
                except TimeoutError:
                    continue
                got.setdefault(addr, []).append(data)
        finally:
            s.close()
        names = {n.address: n.name for n in topo.nodes}
        return {names[a]: v[:per_node] for a, v in got.items() if a in names}

    def close(self) -> None:
        sh("ip", "netns", "del", self.netns, check=False)


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True, check=False, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {proc.stderr.strip()}")
    return proc


def arp_frame(op: int, sha: bytes, spa: str, tpa: str, dst: bytes) -> bytes:
    eth = dst + sha + struct.pack(">H", ETH_P_ARP)
    arp = struct.pack(">HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, sha, socket.inet_aton(spa),
                      b"\0" * 6, socket.inet_aton(tpa))  # fmt: skip
    return eth + arp
