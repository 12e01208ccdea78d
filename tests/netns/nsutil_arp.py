"""Root-test helpers for the ARP/NDP responder.  Also a script: ``-m tests.netns.nsutil_arp serve``.

Owns: the lab (a "switch" netns holding a Linux bridge; a client netns and node netns joined to
it by veths; each node has the traffic IPs on ``lo`` and ``arp_ignore=1``/``arp_announce=2``),
sockets opened inside a lab netns, neighbour-table reads, polling, frame builders/matchers and
the kernel's BPF verdict for the tests, and the responder run as a subprocess under asyncio
(JSON lines on stdin/stdout) inside a node netns.

Must not: touch the root netns, any netns not named ``mhtR-*``, or addresses outside
198.18.0.0/15 and fd00::/8; kill any process it did not start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import selectors
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Any, TypeVar

from multihost.dataplane import arp
from multihost.dataplane.arp import ArpPacket
from multihost.dataplane.responder import attach_filter
from multihost.macaddr import format_mac, multicast_mac

T = TypeVar("T")

PREFIX = "mhtR-"
GROUP = "239.192.0.1"
VIP_MAC = multicast_mac(GROUP)  # 01:00:5e:40:00:01
GROUP6 = "ff15::efc0:1"
VIP_MAC6 = multicast_mac(GROUP6)  # 33:33:ef:c0:00:01
VIP = IPv4Address("198.18.0.100")
VIP2 = IPv4Address("198.18.0.101")
OTHER = IPv4Address("198.18.0.200")  # nobody hosts it
VIP6 = IPv6Address("fd00:198:18::100")
CLIENT_IP = IPv4Address("198.18.0.1")
CLIENT_IP6 = IPv6Address("fd00:198:18::1")
CLIENT_IF = "c0"
NODE_IF = "n0"
ETH_P_ALL = 0x0003
ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
CLONE_NEWNET = 0x4000_0000
REPO = Path(__file__).resolve().parents[2]


def sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} -> {proc.returncode}: {proc.stderr.strip()}")
    return proc


def nsexec(ns: str, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", ns, *args, **kw)


def wait_for(predicate: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)  # polling interval, not synchronisation


def in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a fresh thread that has joined netns ``ns`` (sockets it opens stay there)."""
    assert ns.startswith(PREFIX), ns
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns({ns})")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as e:
            error.append(e)

    thread = threading.Thread(target=target, name=f"netns-{ns}")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def packet_socket(ns: str, ifname: str, proto: int = ETH_P_ALL) -> socket.socket:
    """A bound AF_PACKET socket on ``ifname`` inside ``ns`` (blocking, 2 s timeout)."""

    def make() -> socket.socket:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(proto))
        s.bind((ifname, proto))
        s.settimeout(2.0)
        return s

    return in_netns(ns, make)


def udp_socket(ns: str, family: socket.AddressFamily = socket.AF_INET) -> socket.socket:
    return in_netns(ns, lambda: socket.socket(family, socket.SOCK_DGRAM))


def drain(sock: socket.socket) -> list[bytes]:
    """Every frame queued on ``sock`` right now."""
    frames: list[bytes] = []
    sock.setblocking(False)
    try:
        while True:
            frames.append(sock.recv(65535))
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(2.0)
    return frames


def neighbour(ns: str, dev: str, addr: IPv4Address | IPv6Address) -> dict[str, Any] | None:
    """The ``ip -j neigh`` entry for ``addr`` on ``dev`` (``lladdr``, ``state``), if any."""
    out = nsexec(ns, "ip", "-j", "neigh", "show", "to", str(addr), "dev", dev).stdout
    entries: list[dict[str, Any]] = json.loads(out or "[]")
    return entries[0] if entries else None


def link_mac(ns: str, dev: str) -> bytes:
    info = json.loads(nsexec(ns, "ip", "-j", "link", "show", "dev", dev).stdout)
    return bytes.fromhex(info[0]["address"].replace(":", ""))


@dataclass
class Lab:
    """switch netns (bridge ``br0``) + client netns + ``n`` node netns, all ``mhtR-*``."""

    tag: str
    nodes: list[str]
    switch: str = ""
    client: str = ""
    node_ips: list[IPv4Address] = field(default_factory=list)
    node_macs: list[bytes] = field(default_factory=list)
    client_mac: bytes = b""

    @classmethod
    def create(cls, n_nodes: int = 2) -> Lab:
        tag = uuid.uuid4().hex[:6]
        lab = cls(tag=tag, nodes=[f"{PREFIX}n{i}-{tag}" for i in range(1, n_nodes + 1)])
        lab.switch, lab.client = f"{PREFIX}sw-{tag}", f"{PREFIX}cl-{tag}"
        try:
            lab._build()
        except BaseException:
            lab.destroy()
            raise
        return lab

    def _build(self) -> None:
        sw = self.switch
        for ns in (sw, self.client, *self.nodes):
            sh("ip", "netns", "add", ns)
            nsexec(ns, "ip", "link", "set", "lo", "up")
        nsexec(sw, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
        nsexec(sw, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
        nsexec(sw, "ip", "link", "add", "br0", "type", "bridge", "stp_state", "0")
        nsexec(sw, "ip", "link", "set", "br0", "type", "bridge", "mcast_snooping", "0")
        nsexec(sw, "ip", "link", "set", "br0", "up")
        ports = [("p-cl", self.client, CLIENT_IF)] + [
            (f"p-n{i}", ns, NODE_IF) for i, ns in enumerate(self.nodes, 1)
        ]
        for port, ns, ifname in ports:
            nsexec(sw, "ip", "link", "add", port, "type", "veth", "peer", "name", ifname,
                   "netns", ns)  # fmt: skip
            nsexec(sw, "ip", "link", "set", port, "master", "br0", "up")
            nsexec(ns, "ip", "link", "set", ifname, "up")
        c = self.client
        nsexec(c, "ip", "addr", "add", f"{CLIENT_IP}/24", "dev", CLIENT_IF)
        nsexec(c, "ip", "addr", "add", f"{CLIENT_IP6}/64", "dev", CLIENT_IF, "nodad")
        for i, ns in enumerate(self.nodes, 1):
            ip4, ip6 = IPv4Address(int(CLIENT_IP) + 9 + i), IPv6Address(int(CLIENT_IP6) + 16 + i)
            self.node_ips.append(ip4)
            nsexec(ns, "ip", "addr", "add", f"{ip4}/24", "dev", NODE_IF)
            nsexec(ns, "ip", "addr", "add", f"{ip6}/64", "dev", NODE_IF, "nodad")
            for vip in (VIP, VIP2):
                nsexec(ns, "ip", "addr", "add", f"{vip}/32", "dev", "lo")
            nsexec(ns, "ip", "addr", "add", f"{VIP6}/128", "dev", "lo")
            for conf in (f"net.ipv4.conf.{NODE_IF}", "net.ipv4.conf.all"):
                nsexec(ns, "sysctl", "-qw", f"{conf}.arp_ignore=1", f"{conf}.arp_announce=2")
            self.node_macs.append(link_mac(ns, NODE_IF))
        self.client_mac = link_mac(c, CLIENT_IF)

    def destroy(self) -> None:
        for ns in (self.client, *self.nodes, self.switch):
            if ns.startswith(PREFIX):
                sh("ip", "netns", "del", ns, check=False)

    def client_neighbour(self, addr: IPv4Address | IPv6Address) -> dict[str, Any] | None:
        return neighbour(self.client, CLIENT_IF, addr)


class ResponderProcess:
    """``python -m tests.netns.nsutil_arp serve`` inside a node netns; killed by its PID."""

    def __init__(
        self,
        ns: str,
        addresses: Sequence[IPv4Address | IPv6Address],
        *,
        mode: str = "targets",
        max_frames: int = 64,
    ) -> None:
        assert ns.startswith(PREFIX), ns
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "tests.netns.nsutil_arp", "serve",
               "--iface", NODE_IF, "--vip-mac", format_mac(VIP_MAC), "--vip-mac6",
               format_mac(VIP_MAC6), "--mode", mode, "--max-frames", str(max_frames),
               *(str(a) for a in addresses)]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._sel = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)
        self.hello = self._read(10.0)

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        if not self._sel.select(timeout):
            raise AssertionError(f"responder silent for {timeout}s; stderr: {self._stderr()}")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"responder exited {self.proc.wait()}: {self._stderr()}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def _stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return "(still running)"
        return self.proc.stderr.read()

    def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        return self._read(10.0)

    def counters(self) -> dict[str, int]:
        counters: dict[str, int] = self.call("counters")["counters"]
        return counters

    def stop(self) -> None:
        """Ask it to quit; kill it (by PID, via Popen) if it does not within 5 s."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, AssertionError):
                self.call("quit")
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._sel.close()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


#: ``start(ns, addresses=(VIP, VIP6), **kw)``: a responder the conftest fixture stops after.
Start = Callable[..., ResponderProcess]


# ------------------------------------------------------------------ frames and matchers


def arp_request(lab: Lab, target: IPv4Address, **changes: Any) -> ArpPacket:
    fields: dict[str, Any] = {
        "op": arp.ARP_REQUEST,
        "sha": lab.client_mac,
        "spa": CLIENT_IP,
        "tha": arp.ZERO_MAC,
        "tpa": target,
        "eth_src": lab.client_mac,
        "eth_dst": arp.BROADCAST_MAC,
    }
    fields.update(changes)
    return ArpPacket(**fields)


def arp_replies(frames: list[bytes], spa: IPv4Address | None = None) -> list[ArpPacket]:
    out = []
    for frame in frames:
        pkt = arp.parse_arp(frame)
        if isinstance(pkt, ArpPacket) and pkt.op == arp.ARP_REPLY and spa in (None, pkt.spa):
            out.append(pkt)
    return out


def expect_frame(sock: socket.socket, match: Callable[[bytes], bool], timeout: float) -> bytes:
    """The first frame on ``sock`` that matches (blocking reads with a deadline, no sleeps)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            frame = sock.recv(65535)
        except TimeoutError:
            break
        if match(frame):
            return frame
    raise AssertionError(f"no matching frame within {timeout}s")


def is_reply_for(ip: IPv4Address) -> Callable[[bytes], bool]:
    def match(frame: bytes) -> bool:
        pkt = arp.parse_arp(frame)
        return isinstance(pkt, ArpPacket) and pkt.op == arp.ARP_REPLY and pkt.spa == ip

    return match


def is_reply_to(ip: IPv4Address) -> Callable[[bytes], bool]:
    def match(frame: bytes) -> bool:
        pkt = arp.parse_arp(frame)
        return isinstance(pkt, ArpPacket) and pkt.op == arp.ARP_REPLY and pkt.tpa == ip

    return match


def is_na(frame: bytes) -> bool:
    return isinstance(arp.parse_neighbor_advertisement(frame), arp.NeighborAdvertisement)


def reachable(lab: Lab, addr: IPv4Address | IPv6Address) -> Callable[[], dict[str, Any] | None]:
    def check() -> dict[str, Any] | None:
        entry = lab.client_neighbour(addr)
        return entry if entry and "REACHABLE" in entry.get("state", []) else None

    return check


def bpf_verdicts(prog: list[tuple[int, int, int, int]], frames: list[bytes]) -> list[bool]:
    """The kernel's BPF verdict for each frame (run on an AF_UNIX pair)."""
    sender, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with sender, receiver:
        attach_filter(receiver, prog)
        receiver.setblocking(False)
        out = []
        for frame in frames:
            sender.send(frame)
            try:
                out.append(receiver.recv(65535) == frame)
            except BlockingIOError:
                out.append(False)
        return out


# ------------------------------------------------------------------------ the served side


async def _serve(args: argparse.Namespace) -> None:
    from multihost.dataplane.responder import Responder
    from multihost.macaddr import parse_mac

    loop = asyncio.get_running_loop()
    responder = Responder(
        args.iface,
        [ip_address(a) for a in args.addresses],
        parse_mac(args.vip_mac),
        parse_mac(args.vip_mac6),
        kernel_filter=args.mode,
    )
    loop.add_reader(responder.fileno(), responder.on_readable, args.max_frames)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def say(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    say({"ready": True, "own_mac": format_mac(responder.own_mac), "pid": os.getpid()})
    while line := await reader.readline():
        req = json.loads(line)
        cmd = req["cmd"]
        if cmd == "counters":
            say({"counters": responder.counters()})
        elif cmd == "set":
            responder.set_addresses(ip_address(a) for a in req["addresses"])
            say({"ok": True})
        elif cmd == "announce":
            say({"sent": responder.announce()})
        elif cmd == "cpu":
            t = os.times()
            say({"cpu": t.user + t.system})
        elif cmd == "quit":
            break
        else:
            say({"error": f"unknown command {cmd!r}"})
    loop.remove_reader(responder.fileno())
    responder.close()
    say({"bye": True})


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nsutil_arp")
    sub = parser.add_subparsers(dest="what", required=True)
    serve = sub.add_parser("serve", help="run a Responder under asyncio; JSON lines on stdio")
    serve.add_argument("--iface", required=True)
    serve.add_argument("--vip-mac", required=True)
    serve.add_argument("--vip-mac6", required=True)
    serve.add_argument("--mode", default="targets")
    serve.add_argument("--max-frames", type=int, default=64)
    serve.add_argument("addresses", nargs="*")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
