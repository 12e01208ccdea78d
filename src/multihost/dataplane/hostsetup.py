"""Per-node host setup for multi-hosted traffic IPs, and its exact undo.  Thin shell.

Owns, for one cluster interface:

* the traffic IPs on ``lo`` (IPv4 ``/32``, IPv6 ``/128 nodad``), so the kernel accepts
  packets for them without ever answering ARP/ND for them on the wire itself;
* ``net.ipv4.conf.<if>.arp_ignore = 1`` (answer ARP only for addresses configured on the
  interface itself: the traffic IPs on ``lo`` are answered by the responder with the
  multicast MAC) and ``arp_announce = 2`` (never use a traffic IP as ARP source);
* ``net.ipv6.conf.<if>.drop_unicast_in_l2_multicast = 0`` when there are IPv6 traffic IPs
  (IPv6 checks it *before* the prerouting hook that marks owned packets ``host``; IPv4
  checks its twin after that hook, so it needs no change), and ``ndisc_notify = 0`` on the
  interface and ``lo`` (the kernel never announces a traffic IP with the node's MAC);
* membership of the cluster multicast groups on the interface (``IP_ADD_MEMBERSHIP`` /
  ``IPV6_JOIN_GROUP`` on sockets held open by this object): this programs the NIC's
  multicast filter with the MAC ``01:00:5e`` + low 23 bits of an IPv4 group, ``33:33`` + low
  32 bits of an IPv6 group, so frames to that MAC reach the host;
* the same sysctls and memberships on the return groups' interfaces (IP transparency: the
  back ends' gateway is answered, and their replies arrive, with the cluster MAC there);
* with transparent groups, :class:`~multihost.dataplane.transparent.TransparentSetup`
  (``socket transparent`` mark, fwmark rule, ``local`` route: replies to client addresses
  reach the proxy's transparent socket), applied last and restored first.

:meth:`HostSetup.restore` undoes exactly what :meth:`HostSetup.apply` changed: it removes
only addresses it added and puts back the previous sysctl values (unless someone else
changed them meanwhile); both calls are idempotent.

Must not: touch nftables (``nft``) other than through ``TransparentSetup``, answer ARP/ND
(the responder), change link state, or modify interfaces and settings other than the ones
listed above.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from pyroute2 import IPRoute

from multihost.dataplane.nft import netns_entered
from multihost.dataplane.transparent import TransparentSetup

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IFA_F_NODAD = 0x02


class HostSetupError(RuntimeError):
    """The host cannot be set up as asked (the message says what to fix)."""


@dataclass(frozen=True)
class _Sysctl:
    path: str
    wanted: str


def _sysctl_path(family: str, interface: str, key: str) -> str:
    # VLAN names such as eth0.100 appear as eth0/100 under /proc/sys.
    return f"/proc/sys/net/{family}/conf/{interface.replace('.', '/')}/{key}"


def _read(path: str) -> str:
    with open(path, encoding="ascii") as f:
        return f.read().strip()


def _write(path: str, value: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(value + "\n")


class HostSetup:
    """Set up (and later restore) one node for serving ``addresses`` via ``interface``."""

    def __init__(
        self,
        interface: str,
        addresses: Iterable[IPAddress],
        groups: IPAddress | Iterable[IPAddress],
        *,
        netns: str | None = None,
        loopback: str = "lo",
        extra_interfaces: Iterable[str] = (),
        transparent: TransparentSetup | None = None,
    ) -> None:
        self.interface = interface
        self.interfaces = tuple(dict.fromkeys((interface, *extra_interfaces)))
        self.transparent = transparent
        self.addresses = tuple(dict.fromkeys(addresses))
        if isinstance(groups, ipaddress.IPv4Address | ipaddress.IPv6Address):
            groups = (groups,)
        self.groups = tuple(groups)
        self.netns = netns
        self.loopback = loopback
        for g in self.groups:
            if not g.is_multicast:
                raise HostSetupError(f"cluster group {g} is not a multicast address")
        self._added: list[IPAddress] = []
        self._sysctls: dict[str, tuple[str, str]] = {}  # path -> (previous, ours)
        self._mcast: list[socket.socket] = []
        self._applied = False

    @property
    def applied(self) -> bool:
        return self._applied

    @property
    def added_addresses(self) -> tuple[IPAddress, ...]:
        """The addresses :meth:`apply` added (and :meth:`restore` will remove)."""
        return tuple(self._added)

    def _wanted_sysctls(self) -> list[_Sysctl]:
        out = []
        for iface in self.interfaces:
            out.append(_Sysctl(_sysctl_path("ipv4", iface, "arp_ignore"), "1"))
            out.append(_Sysctl(_sysctl_path("ipv4", iface, "arp_announce"), "2"))
        if any(a.version == 6 for a in self.addresses):
            for iface in self.interfaces:
                path = _sysctl_path("ipv6", iface, "drop_unicast_in_l2_multicast")
                out.append(_Sysctl(path, "0"))
                # Only the responder announces traffic IPs (with the cluster MAC): never
                # the kernel, with the node's own MAC, when an address or the link changes.
                out.append(_Sysctl(_sysctl_path("ipv6", iface, "ndisc_notify"), "0"))
            out.append(_Sysctl(_sysctl_path("ipv6", self.loopback, "ndisc_notify"), "0"))
        return out

    def apply(self) -> None:
        """Configure the host; on failure undo the partial work and raise.  Idempotent."""
        if self._applied:
            return
        try:
            with netns_entered(self.netns):
                self._apply()
        except BaseException:
            self.restore()
            raise
        self._applied = True

    def _apply(self) -> None:
        with IPRoute() as ipr:
            indexes = [self._index(ipr, name) for name in self.interfaces]
            lo = self._index(ipr, self.loopback)
            present = self._addresses_by_index(ipr)
            for addr in self.addresses:
                elsewhere = [i for i, addrs in present.items() if addr in addrs and i != lo]
                if elsewhere:
                    raise HostSetupError(
                        f"traffic IP {addr} is configured on interface index {elsewhere[0]};"
                        f" it must only be on {self.loopback}"
                    )
            for s in self._wanted_sysctls():
                previous = _read(s.path)
                if previous != s.wanted:
                    _write(s.path, s.wanted)
                    self._sysctls[s.path] = (previous, s.wanted)
            for addr in self.addresses:
                if addr in present.get(lo, set()):
                    continue
                if addr.version == 4:
                    ipr.addr("add", index=lo, address=str(addr), prefixlen=32)
                else:
                    ipr.addr("add", index=lo, address=str(addr), prefixlen=128, flags=IFA_F_NODAD)
                self._added.append(addr)
        for index, name in zip(indexes, self.interfaces, strict=True):
            for group in self.groups:
                self._mcast.append(_join(group, index, name))
        if self.transparent is not None:
            self.transparent.apply()

    def restore(self) -> None:
        """Undo what :meth:`apply` did (the transparency plumbing, leave the group, remove
        added addresses, put back sysctls that still hold our value).  Idempotent; safe
        after a failed apply."""
        if self.transparent is not None:
            self.transparent.restore()
        while self._mcast:
            self._mcast.pop().close()  # the kernel leaves a group with its last member socket
        with netns_entered(self.netns):
            if self._added:
                with IPRoute() as ipr:
                    lo = self._index(ipr, self.loopback)
                    for addr in list(self._added):
                        plen = 32 if addr.version == 4 else 128
                        try:
                            ipr.addr("del", index=lo, address=str(addr), prefixlen=plen)
                        except Exception as e:  # pyroute2 raises NetlinkError (an OSError)
                            if getattr(e, "code", None) not in (errno.EADDRNOTAVAIL, errno.ENOENT):
                                raise
                        self._added.remove(addr)
            for path, (previous, ours) in list(self._sysctls.items()):
                try:
                    if _read(path) == ours:
                        _write(path, previous)
                except FileNotFoundError:
                    pass  # the interface is gone, and its settings with it
                del self._sysctls[path]
        self._applied = False

    @staticmethod
    def _index(ipr: IPRoute, name: str) -> int:
        found = ipr.link_lookup(ifname=name)
        if not found:
            raise HostSetupError(f"no interface {name!r}")
        return int(found[0])

    @staticmethod
    def _addresses_by_index(ipr: IPRoute) -> dict[int, set[IPAddress]]:
        out: dict[int, set[IPAddress]] = {}
        for msg in ipr.get_addr():
            raw = msg.get_attr("IFA_ADDRESS")
            if raw is None:
                continue
            out.setdefault(int(msg["index"]), set()).add(ipaddress.ip_address(raw))
        return out


def _join(group: IPAddress, ifindex: int, interface: str) -> socket.socket:
    """A socket holding ``group`` joined on ``ifindex`` (IGMP/MLD report, NIC filter)."""
    if group.version == 4:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        level, opt = socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP
        mreq = struct.pack("=4s4si", group.packed, bytes(4), ifindex)
    else:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        level, opt = socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP
        mreq = struct.pack("=16sI", group.packed, ifindex)
    try:
        sock.setsockopt(level, opt, mreq)
    except OSError as e:
        sock.close()
        raise HostSetupError(f"cannot join {group} on {interface}: {e}") from e
    return sock


def multicast_memberships(interface: str, netns: str | None = None) -> set[str]:
    """Link-layer multicast addresses programmed on ``interface`` (``/proc/net/dev_mcast``)."""
    with netns_entered(netns):
        fd = os.open("/proc/thread-self/net/dev_mcast", os.O_RDONLY)
        try:
            data = b""
            while chunk := os.read(fd, 65536):
                data += chunk
        finally:
            os.close(fd)
    out: set[str] = set()
    for line in data.decode().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[1] == interface:
            mac = parts[4]
            out.add(":".join(mac[i : i + 2] for i in range(0, 12, 2)))
    return out
