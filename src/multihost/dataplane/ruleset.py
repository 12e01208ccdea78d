"""The specs of the node's nftables ruleset and the bucket states it holds.  Pure.

Owns: what a ruleset is made of -- traffic IP groups (:class:`GroupSpec`), return groups
for IP transparency (:class:`ReturnSpec`), the whole (:class:`RulesetSpec`) -- and their
validation; the buckets of a group this node serves, by handover state
(:class:`GroupBuckets`), validated against a spec by :func:`check_state`; the names the
tables give their maps, chains, counters and lease set, and which map element a bucket state
stands for (:func:`map_contents`, the data as nft writes it).  The XDP data plane takes the
same specs and states.

Must not: render nft scripts (:mod:`.rulesettables` renders the tables and the scripts that
install, lease or remove them, :mod:`.rulesetdelta` the bucket updates between two states)
or run anything (no subprocess, sockets, ctypes or clocks).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from multihost.flowhash import RETURN_MODES, HashMode

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

SET_KINDS = ("owned", "draining", "incoming")
LEASE_SET = "lease"  # while its elements exist, this node may take new flows (rulesettables)
LEASE_KEYS = ("ipv4", "ipv6")
LEASE_KEY_VALUES = (2, 10)  # the same keys as meta nfproto values (NFPROTO_IPV4, _IPV6)
HANDOVER_TAG = "other"  # meta pkttype of a handover bucket's packet between -300 and -150
PKTTYPE_VALUES = {"host": 0, HANDOVER_TAG: 3}  # the kernel's PACKET_HOST, PACKET_OTHERHOST
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}$")


class RulesetError(ValueError):
    """A spec or bucket state that cannot be rendered (the message names the culprit)."""


def check_table_name(table: str) -> None:
    """Refuse a table name that is not a plain nft identifier."""
    if not _NAME.match(table):
        raise RulesetError(f"table name {table!r} is not a plain identifier")


@dataclass(frozen=True)
class GroupSpec:
    """A traffic IP group: its addresses and how its flows are hashed."""

    name: str
    addresses: tuple[IPAddress, ...]
    hash_mode: HashMode = HashMode.FOUR_TUPLE

    def check(self) -> None:
        if not _NAME.match(self.name):
            raise RulesetError(
                f"group name {self.name!r}: use a letter then letters, digits or '_' (max 32)"
            )
        if not self.addresses:
            raise RulesetError(f"group {self.name!r} has no addresses")
        if len(set(self.addresses)) != len(self.addresses):
            raise RulesetError(f"group {self.name!r} lists an address twice")
        for a in self.addresses:
            if a.is_multicast or a.is_unspecified:
                raise RulesetError(f"group {self.name!r}: {a} cannot be a traffic IP")
        HashMode(self.hash_mode)

    def family_addresses(self, family: int) -> tuple[IPAddress, ...]:
        return tuple(a for a in self.addresses if a.version == family)


_IFNAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")
_MAC = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")


@dataclass(frozen=True)
class ReturnSpec:
    """A return group (IP transparency): the back ends' gateway ``addresses``; replies to
    clients arrive on ``interface`` addressed to a cluster MAC (``macs``: family -> MAC,
    lower-case ``aa:bb:...``) with the client's unicast IP.  They are hashed with
    ``hash_mode`` (the destination words of the reply: the source words of the request)
    and decided by the *front* group's maps, so both directions share one bucket state."""

    name: str
    front: str
    addresses: tuple[IPAddress, ...]
    interface: str
    hash_mode: HashMode
    macs: tuple[tuple[int, str], ...]

    def check(self) -> None:
        GroupSpec(self.name, self.addresses, self.hash_mode).check()
        if self.hash_mode not in RETURN_MODES.values():
            raise RulesetError(
                f"return group {self.name!r}: {self.hash_mode.value} is not a return mode"
            )
        if not _IFNAME.match(self.interface):
            raise RulesetError(f"return group {self.name!r}: bad interface {self.interface!r}")
        have = dict(self.macs)
        for family in {a.version for a in self.addresses}:
            if not _MAC.match(have.get(family, "")):
                raise RulesetError(f"return group {self.name!r}: no IPv{family} cluster MAC")

    def family_addresses(self, family: int) -> tuple[IPAddress, ...]:
        return tuple(a for a in self.addresses if a.version == family)

    def mac(self, family: int) -> str:
        return dict(self.macs)[family]


@dataclass(frozen=True)
class RulesetSpec:
    """Everything about the ruleset except which buckets this node serves."""

    buckets: int
    seed: int
    groups: tuple[GroupSpec, ...]
    table: str = "multihost"
    guard_table: str = "multihost_guard"
    returns: tuple[ReturnSpec, ...] = ()

    def check(self) -> None:
        if not 1 <= self.buckets <= 0xFFFFFFFF:
            raise RulesetError(f"bucket count {self.buckets} is outside 1..2^32-1")
        if not 0 <= self.seed <= 0xFFFFFFFF:
            raise RulesetError(f"seed {self.seed} is not a 32-bit value")
        for t in (self.table, self.guard_table):
            check_table_name(t)
        if self.table == self.guard_table:
            raise RulesetError("owned and guard table need different names")
        seen_names: set[str] = set()
        seen_addr: dict[IPAddress, str] = {}
        for g in self.groups:
            g.check()
            if g.name in seen_names:
                raise RulesetError(f"group {g.name!r} appears twice")
            seen_names.add(g.name)
            for a in g.addresses:
                if a in seen_addr:
                    raise RulesetError(f"{a} is in groups {seen_addr[a]!r} and {g.name!r}")
                seen_addr[a] = g.name
        carried: set[tuple[str, int]] = set()
        for r in self.returns:
            r.check()
            if r.name in seen_names:
                raise RulesetError(f"group {r.name!r} appears twice")
            seen_names.add(r.name)
            front = self.group(r.front)  # raises for an unknown one
            if RETURN_MODES.get(front.hash_mode) is not r.hash_mode:
                raise RulesetError(
                    f"return group {r.name!r} hashes {r.hash_mode.value}, not the return mode "
                    f"of {front.name!r} ({front.hash_mode.value})"
                )
            for a in r.addresses:
                if a in seen_addr:
                    raise RulesetError(f"{a} is in groups {seen_addr[a]!r} and {r.name!r}")
                seen_addr[a] = r.name
                if (r.interface, a.version) in carried:
                    raise RulesetError(
                        f"two return groups for IPv{a.version} replies on {r.interface}"
                    )
                carried.add((r.interface, a.version))

    def group(self, name: str) -> GroupSpec:
        for g in self.groups:
            if g.name == name:
                return g
        raise RulesetError(f"unknown group {name!r}")


@dataclass(frozen=True)
class GroupBuckets:
    """The buckets of one group this node serves, by handover state (pairwise disjoint)."""

    owned: frozenset[int] = field(default_factory=frozenset)
    draining: frozenset[int] = field(default_factory=frozenset)
    incoming: frozenset[int] = field(default_factory=frozenset)

    def of(self, kind: str) -> frozenset[int]:
        sets: dict[str, frozenset[int]] = {
            "owned": self.owned,
            "draining": self.draining,
            "incoming": self.incoming,
        }
        return sets[kind]


EMPTY = GroupBuckets()


def bucket_map(group: GroupSpec) -> str:
    """The map of every bucket the node serves (``host`` / ``other``)."""
    return f"{group.name}_buckets"


def handover_map(group: GroupSpec) -> str:
    """The map of the handover buckets (``goto`` the kind's chain)."""
    return f"{group.name}_handover"


def kind_chains(group: GroupSpec) -> dict[str, str]:
    """Handover kind (``draining``/``incoming``) -> the chain its elements go to."""
    return {k: f"{group.name}_{k}" for k in SET_KINDS[1:]}


def map_contents(group: GroupSpec, gb: GroupBuckets) -> dict[str, dict[str, frozenset[int]]]:
    """Map name -> element data (as nft writes it) -> the keys that carry it."""
    chains = kind_chains(group)
    return {
        bucket_map(group): {"host": gb.owned, HANDOVER_TAG: gb.draining | gb.incoming},
        handover_map(group): {f"goto {chains[k]}": gb.of(k) for k in chains},
    }


def counter_names(group: GroupSpec | ReturnSpec) -> dict[str, str]:
    """``accepted`` / ``dropped`` -> nft named counter."""
    return {k: f"{group.name}_{k}" for k in ("accepted", "dropped")}


@functools.lru_cache(maxsize=4)
def _all_buckets(buckets: int) -> frozenset[int]:
    return frozenset(range(buckets))


def _in_range(members: frozenset[int], buckets: int) -> bool:
    # A subset test is twice as fast as min() + max(), but the set of every bucket costs
    # ~90 bytes a bucket: keep it for the nft-sized tables (<= 65,536 buckets) only (the
    # 16-slot table's 720,720 would hold 60 MB in every agent).
    if buckets <= 1 << 16:
        return members <= _all_buckets(buckets)
    return min(members) >= 0 and max(members) < buckets


def check_state(spec: RulesetSpec, state: Mapping[str, GroupBuckets]) -> dict[str, GroupBuckets]:
    """Validated state with an entry for every group of ``spec`` (missing: owns nothing)."""
    names = {g.name for g in spec.groups}
    for name in state:
        if name not in names:
            raise RulesetError(f"state names unknown group {name!r}")
    out: dict[str, GroupBuckets] = {}
    for g in spec.groups:
        gb = state.get(g.name, EMPTY)
        for kind in SET_KINDS:
            members = gb.of(kind)
            if members and not _in_range(members, spec.buckets):
                bad = min(members) if min(members) < 0 else max(members)
                raise RulesetError(
                    f"group {g.name!r} {kind}: bucket {bad} is outside 0..{spec.buckets - 1}"
                )
        for i, k1 in enumerate(SET_KINDS):
            for k2 in SET_KINDS[i + 1 :]:
                both = gb.of(k1) & gb.of(k2)
                if both:
                    raise RulesetError(
                        f"group {g.name!r}: bucket {min(both)} is both {k1} and {k2}"
                    )
        out[g.name] = gb
    return out
