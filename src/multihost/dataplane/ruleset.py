"""Pure rendering of the node's nftables scripts (text for ``nft -f`` / libnftables).

Owns: the shape of the two tables, the names of their maps, chains and counters, the hash
expression (derived from :func:`multihost.flowhash.hash_fields`, so the rule and the model
cannot drift), validation of specs and bucket states, and bucket deltas between two states.

Must not: run anything (no subprocess, sockets, ctypes or clocks); ``nft.Dataplane`` applies
what this module renders.

Tables
------
``multihost`` (``flags owner``: belongs to the netlink socket of the agent's libnftables
context), per group two maps and two named counters ``<group>_accepted`` /
``<group>_dropped``: ``<group>_buckets`` holds every bucket this node serves, ``owned`` as
``bucket : host``, ``draining`` and ``incoming`` as ``bucket : other``; ``<group>_handover``
holds only the latter, as ``bucket : goto <group>_draining`` / ``goto <group>_incoming``.

* chain ``hook_raw`` (priority -300, before conntrack): a packet to a traffic IP is hashed
  *once*, and ``meta pkttype set <hash> map @<group>_buckets`` does the rest: ``host`` for
  an owned bucket (without it TCP discards the L2-multicast packet): counted as accepted
  and accepted, done; ``other`` for a handover bucket: accepted, to be decided at -150 --
  a *tag*: the kernel drops ``otherhost`` packets before the prerouting hook, so at
  prerouting only this chain produces it; no element: counted as dropped and dropped,
  before conntrack ever sees the packet.
* chain ``hook_ct`` (priority -150, after conntrack): anything untagged leaves at the first
  rule (one compare).  A tagged packet in ``ct state established,related`` is accepted in
  either handover kind; otherwise ``<hash> vmap @<group>_handover`` picks its kind:
  ``draining`` drops TCP and accepts the rest, ``incoming`` accepts a pure SYN (``syn``
  without ``ack|fin|rst``) in ``ct state new`` and drops the rest.  Accepting sets
  ``pkttype host`` and counts.  A bucket that became ``owned`` in between (an update
  between the two hooks) is accepted; one no longer served is dropped.

  UDP, SCTP, DCCP, UDP-Lite and port-less protocols do not take part in the graceful
  handover: ``draining`` accepts them like ``owned`` and ``incoming`` only with
  ``ct state established,related``.  A node cannot tell a UDP flow that is new to the
  cluster from one that is live on the old owner (``ct state new`` is local), so accepting
  ``new`` on the incoming node would deliver every live UDP flow to two nodes at once (a
  QUIC server answering with stateless resets).  Keeping them with the old owner until the
  bucket moves to ``owned`` preserves "exactly one node per packet" at every instant.

The set ``lease`` (``ipv4``, ``ipv6``; ``flags timeout``) is the node's membership lease in
the kernel: a dead-man switch.  The agent keeps it filled with an expiry no later than the
moment a peer may declare this node dead and take its buckets (``render_lease``).  If the
agent stalls or lapses, the elements expire by themselves and the kernel stops taking new
flows at once: an owned bucket's packet is re-tagged at -300 and, at -150, only
``ct state established,related`` is accepted (as for ``draining``), and ``incoming`` no
longer accepts SYNs.  A stalled node therefore never answers a flow that a peer took over
meanwhile (no second SYN-ACK, no reset of the peer's new flows), while its own established
connections go on.  A lapse or a renewal is a one-element update, not a rewrite of the maps.

Each packet to a traffic IP is counted once: owned buckets and ICMP errors as accepted and
buckets not served as dropped at -300, handover buckets at -150 (loopback packets are
neither filtered nor counted).

``multihost_guard`` (static, not owner-flagged), hook prerouting priority -250, between the
two: drops packets to a traffic IP whose ``meta pkttype`` is neither ``host`` nor the tag
``other``.  Clients reach a traffic IP through a *multicast* MAC, so such packets arrive as
``multicast``; only the owned table turns the buckets this node serves into ``host`` (or
``other``).  When the owning process dies the kernel deletes the owned table and the guard
drops everything to the traffic IPs: UDP fails closed too (TCP would already drop non-host
packets itself).  Its chain ``conntrack`` is never run: adding its ``ct`` rule makes this
netns use conntrack, which enables IPv4/IPv6 defragmentation at priority -400: the -300
chain then hashes reassembled datagrams, not fragments without ports.

Flows: tcp/udp/sctp/dccp/udplite hash ``hash_fields(mode, has_ports=True)`` (``th sport`` /
``th dport``); other protocols, ICMP echo included, ``hash_fields(mode, has_ports=False)``,
so a ping is answered by exactly one node.  ICMP errors (destination-unreachable,
time-exceeded, parameter-problem; ICMPv6 also packet-too-big) to a traffic IP go to *every*
node: the owner needs them (PMTU discovery), the others have no socket for the embedded flow
and ignore them, and hashing the embedded inner header instead would need a second,
fragile parser.  ICMPv6 neighbour discovery to a traffic IP (unicast NUD probes, redirects)
goes to every node too.  Packets arriving on loopback (the node talking to its own traffic
IP) are not filtered.

Cost per packet (``bench/bench_dataplane.py``): one jhash and one map lookup at -300, for a
dropped packet too (then a counter, nothing else); one compare in the guard and one at -150
for everything settled at -300.  Only packets of handover buckets hash again at -150.

Map key: ``typeof meta length`` with ``size B``: a 32-bit host-order integer, exactly the
register ``jhash`` writes (nft 1.0.6 refuses ``type integer``).  With a 4-byte key and a
fixed ``size`` the kernel picks its fixed-size hash (``nft_hash_fast``): O(1) per element
update.  It never picks its bitmap for a map (bitmaps hold no data); a 16-bit *set* gets
the bitmap, whose insert and delete scan a list of all elements (``nft_bitmap_elem_find``):
20,000 elements take ~1.8 s to add on kernel 6.18.  ``<group>_buckets`` maps to a
``pkttype`` value rather than to a verdict on purpose: adding ``goto`` elements to a verdict
map makes the kernel re-validate every element of the map, for every rule that uses it, at
commit (``nft_lookup_validate``): 6,720 additions took ~11 ms instead of ~2.5 ms.  Only the
handover map, which holds nothing outside a handover, pays that.  A bucket whose data
changes is deleted and re-added in the same transaction (the kernel refuses to overwrite
an element's data).
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from multihost.flowhash import RETURN_MODES, HashMode, hash_fields

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

PRIORITY_RAW = -300
PRIORITY_GUARD = -250
PRIORITY_CT = -150
SET_KINDS = ("owned", "draining", "incoming")
PORT_PROTOCOLS = ("tcp", "udp", "sctp", "dccp", "udplite")
ICMP_TO_ALL = ("destination-unreachable", "time-exceeded", "parameter-problem")
ICMPV6_TO_ALL = (
    "destination-unreachable",
    "packet-too-big",
    "time-exceeded",
    "parameter-problem",
    "nd-neighbor-solicit",
    "nd-neighbor-advert",
    "nd-redirect",
)
LEASE_SET = "lease"  # while its elements exist, this node may take new flows (see docstring)
LEASE_KEYS = ("ipv4", "ipv6")
LEASE_KEY_VALUES = (2, 10)  # the same keys as meta nfproto values (NFPROTO_IPV4, _IPV6)
HANDOVER_TAG = "other"  # meta pkttype of a handover bucket's packet between -300 and -150
PKTTYPE_VALUES = {"host": 0, HANDOVER_TAG: 3}  # the kernel's PACKET_HOST, PACKET_OTHERHOST
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}$")
_FIELDS = {
    4: {"saddr": "ip saddr", "daddr": "ip daddr", "sport": "th sport", "dport": "th dport"},
    6: {"saddr": "ip6 saddr", "daddr": "ip6 daddr", "sport": "th sport", "dport": "th dport"},
}
_ELEMENTS_PER_LINE = 16


class RulesetError(ValueError):
    """A spec or bucket state that cannot be rendered (the message names the culprit)."""


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
            if not _NAME.match(t):
                raise RulesetError(f"table name {t!r} is not a plain identifier")
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


def jhash_expr(
    spec: RulesetSpec, group: GroupSpec | ReturnSpec, family: int, has_ports: bool
) -> str:
    """The nft hash expression for a group's packets of one family and protocol class."""
    fields = " . ".join(_FIELDS[family][f] for f in hash_fields(group.hash_mode, has_ports))
    return f"jhash {fields} mod {spec.buckets} seed {spec.seed:#x}"


def _lines(items: list[str], per_line: int, indent: str) -> str:
    lines = [", ".join(items[i : i + per_line]) for i in range(0, len(items), per_line)]
    return (",\n" + indent).join(lines)


def _elements(values: Iterable[int], indent: str) -> str:
    return _lines([str(v) for v in sorted(values)], _ELEMENTS_PER_LINE, indent)


def _map_elements(items: Iterable[tuple[int, str]], indent: str) -> str:
    """``key : data`` items, ascending by key."""
    ordered = sorted(items)
    per_line = _ELEMENTS_PER_LINE // (4 if any(" " in d for _, d in ordered[:1]) else 2)
    return _lines([f"{k} : {d}" for k, d in ordered], per_line, indent)


def _addr_match(family: int, addresses: tuple[IPAddress, ...]) -> str:
    key = "ip daddr" if family == 4 else "ip6 daddr"
    if len(addresses) == 1:
        return f"{key} {addresses[0]}"
    return f"{key} {{ {', '.join(str(a) for a in addresses)} }}"


def _fam(family: int) -> str:
    return "4" if family == 4 else "6"


def _to_all(family: int) -> str:
    if family == 4:
        return f"icmp type {{ {', '.join(ICMP_TO_ALL)} }}"
    return f"icmpv6 type {{ {', '.join(ICMPV6_TO_ALL)} }}"


def _chain(name: str, rules: list[str], hook: str | None = None) -> list[str]:
    lines = [f"\tchain {name} {{"]
    if hook is not None:
        lines.append(f"\t\t{hook}")
    lines += [f"\t\t{r}" for r in rules]
    lines.append("\t}")
    return lines


LEASED = f"meta nfproto @{LEASE_SET}"
LAPSED = (
    f"meta pkttype host meta nfproto != @{LEASE_SET} meta pkttype set {HANDOVER_TAG} accept"
    ' comment "lease lapsed: established flows only, decided at -150"'
)


def _kind_chains(g: GroupSpec) -> list[str]:
    """``<g>_draining`` / ``<g>_incoming``: the -150 verdict on a tagged, not established
    packet of a handover bucket."""
    cnt = counter_names(g)
    acc = f'meta pkttype set host counter name "{cnt["accepted"]}" accept'
    drop = f'counter name "{cnt["dropped"]}" drop'
    syn = "tcp flags & (fin | syn | rst | ack) == syn ct state new"
    chains = kind_chains(g)
    out: list[str] = []
    for name, rules in (
        (chains["draining"], [f"meta l4proto tcp {drop}", acc]),
        (chains["incoming"], [f"{syn} {LEASED} {acc}", drop]),
    ):
        out += ["", *_chain(name, rules)]
    return out


def _group_chains(
    spec: RulesetSpec, g: GroupSpec | ReturnSpec, family: int, maps: GroupSpec | None = None
) -> list[str]:
    """The chains of one group and family: ``raw`` and ``raw_ports`` (-300), ``ct`` and
    ``ct_ports`` (-150); no ``_ports`` chains when ports do not change the hash.  ``maps``:
    the group whose bucket maps decide (a return group's front group; default ``g``)."""
    owner = maps if maps is not None else g
    assert isinstance(owner, GroupSpec)
    cnt = counter_names(g)
    acc = f'counter name "{cnt["accepted"]}" accept'
    drop = f'counter name "{cnt["dropped"]}" drop'
    # source-ip hashes the same with or without ports: no protocol dispatch then
    split = hash_fields(g.hash_mode, True) != hash_fields(g.hash_mode, False)

    def tail(stage: str, ports: bool) -> list[str]:
        h = jhash_expr(spec, g, family, has_ports=ports)
        serve = f"meta pkttype set {h} map @{bucket_map(owner)} meta pkttype host {LEASED} {acc}"
        if stage == "raw":
            return [serve, LAPSED, f"meta pkttype {HANDOVER_TAG} accept", drop]
        return [f"{h} vmap @{handover_map(owner)}", serve, drop]

    out: list[str] = []
    for stage, head in (
        ("raw", ["meta iiftype loopback accept"]),
        ("ct", [f"ct state established,related meta pkttype set host {acc}"]),
    ):
        name = f"{g.name}_{stage}{_fam(family)}"
        if split:
            head.append(f"meta l4proto {{ {', '.join(PORT_PROTOCOLS)} }} goto {name}_ports")
        if stage == "raw":
            head.append(f"{_to_all(family)} meta pkttype set host {acc}")
        out += ["", *_chain(name, [*head, *tail(stage, False)])]
        if split:
            out += ["", *_chain(f"{name}_ports", tail(stage, True))]
    return out


_MULTICAST = {4: "ip daddr != 224.0.0.0/4", 6: "ip6 daddr != ff00::/8"}


def return_match(r: ReturnSpec, family: int) -> str:
    """A reply to a client through return group ``r``: on its interface, to the cluster MAC
    of the family, to a unicast IP (heartbeats and other IP multicast carry group MACs)."""
    return f'iifname "{r.interface}" ether daddr {r.mac(family)} {_MULTICAST[family]}'


def _dispatch(spec: RulesetSpec, kind: str) -> list[str]:
    rules = []
    for g in spec.groups:
        for family in (4, 6):
            addrs = g.family_addresses(family)
            if addrs:
                rules.append(f"{_addr_match(family, addrs)} goto {g.name}_{kind}{_fam(family)}")
    for r in spec.returns:  # after the traffic IPs: a packet to one of them is not a reply
        for family in (4, 6):
            addrs = r.family_addresses(family)
            if addrs:
                rules.append(f"{_addr_match(family, addrs)} goto {r.name}_{kind}{_fam(family)}")
    for r in spec.returns:
        for family in (4, 6):
            if r.family_addresses(family):
                rules.append(f"{return_match(r, family)} goto {r.name}_{kind}{_fam(family)}")
    return rules


def render_owned_table(spec: RulesetSpec, state: Mapping[str, GroupBuckets]) -> str:
    """The complete owned table (``flags owner``) holding ``state``."""
    spec.check()
    full = check_state(spec, state)
    lines = [f"table inet {spec.table} {{", "\tflags owner", ""]
    lines += [f"\tset {LEASE_SET} {{", "\t\ttypeof meta nfproto", "\t\tflags timeout"]
    lines += [f"\t\telements = {{ {', '.join(LEASE_KEYS)} }}", "\t}"]
    for g in spec.groups:
        lines.append("")
        for c in counter_names(g).values():
            lines += [f"\tcounter {c} {{", "\t}"]
        for name, typeof in ((bucket_map(g), "meta pkttype"), (handover_map(g), "verdict")):
            lines += [f"\tmap {name} {{", f"\t\ttypeof meta length : {typeof}"]
            lines.append(f"\t\tsize {spec.buckets}")
            items = [(k, d) for d, ks in map_contents(g, full[g.name])[name].items() for k in ks]
            if items:
                indent = "\t\t\t"
                lines.append(f"\t\telements = {{\n{indent}{_map_elements(items, indent)}\n\t\t}}")
            lines.append("\t}")
        lines += _kind_chains(g)
    hook = "type filter hook prerouting priority {}; policy accept;"
    lines += ["", *_chain("hook_raw", _dispatch(spec, "raw"), hook.format(PRIORITY_RAW))]
    untagged = f"meta pkttype != {HANDOVER_TAG} accept"
    stray = f'meta pkttype {HANDOVER_TAG} drop comment "tagged for a traffic IP no longer here"'
    ct_rules = [untagged, *_dispatch(spec, "ct"), stray]
    lines += ["", *_chain("hook_ct", ct_rules, hook.format(PRIORITY_CT))]
    for g in spec.groups:
        for family in (4, 6):
            if g.family_addresses(family):
                lines += _group_chains(spec, g, family)
    for r in spec.returns:
        lines.append("")
        for c in counter_names(r).values():
            lines += [f"\tcounter {c} {{", "\t}"]
        for family in (4, 6):
            if r.family_addresses(family):
                lines += _group_chains(spec, r, family, spec.group(r.front))
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_guard_table(spec: RulesetSpec) -> str:
    """The static guard table: drop packets to any traffic IP that are not ``host``
    (nor tagged ``other`` by the owned table)."""
    spec.check()
    rules = [
        "meta pkttype host accept",
        f'meta pkttype {HANDOVER_TAG} accept comment "a handover bucket, tagged at -300"',
    ]
    for family in (4, 6):
        every: list[GroupSpec | ReturnSpec] = [*spec.groups, *spec.returns]
        addrs = tuple(a for g in every for a in g.family_addresses(family))
        if addrs:
            rules.append(f'{_addr_match(family, addrs)} counter name "dropped" drop')
    for r in spec.returns:
        for family in (4, 6):
            if r.family_addresses(family):
                rules.append(f'{return_match(r, family)} counter name "dropped" drop')
    never = ['ct state invalid continue comment "never run: makes this netns use conntrack"']
    hook = f"type filter hook prerouting priority {PRIORITY_GUARD}; policy accept;"
    lines = [f"table inet {spec.guard_table} {{", "\tcounter dropped {", "\t}", ""]
    lines += _chain("conntrack", never)
    lines += ["", *_chain("prerouting", rules, hook)]
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_install(
    spec: RulesetSpec, state: Mapping[str, GroupBuckets], *, take_over: bool = False
) -> str:
    """One transaction replacing both tables (creating them if absent).

    ``take_over``: the owned table exists *without* ``flags owner`` (left by hand or an old
    version); the kernel refuses to add the flag to it, so it is deleted as a plain table.
    """
    owner = "" if take_over else " { flags owner; }"
    return (
        f"add table inet {spec.guard_table}\n"
        f"delete table inet {spec.guard_table}\n"
        + render_guard_table(spec)
        + f"add table inet {spec.table}{owner}\n"
        + f"delete table inet {spec.table}\n"
        + render_owned_table(spec, state)
    )


TRANSPARENT_TABLE = "multihost_transparent"


def render_transparent_table(mark: int, table: str = TRANSPARENT_TABLE) -> str:
    """The static table of IP transparency (``docs/transparency.md``): a packet whose
    socket lookup finds a *transparent* socket (a proxy connected from the client's address:
    the back end's reply to the client) gets ``mark``, which the node's ``ip rule fwmark
    MARK lookup TABLE`` sends to ``local default dev lo``: delivered to that socket instead
    of forwarded.  Replaced in one transaction; not owner-flagged (harmless alone)."""
    if not 1 <= mark <= 0xFFFFFFFF:
        raise RulesetError(f"mark {mark} is not a non-zero 32-bit value")
    if not _NAME.match(table):
        raise RulesetError(f"table name {table!r} is not a plain identifier")
    hook = "type filter hook prerouting priority mangle; policy accept;"
    rule = (
        f"socket transparent 1 meta mark set {mark:#x} accept"
        ' comment "reply to a transparent socket: fwmark -> local route"'
    )
    lines = [f"add table inet {table}", f"delete table inet {table}", f"table inet {table} {{"]
    lines += [*_chain("prerouting", [rule], hook), "}"]
    return "\n".join(lines) + "\n"


def render_lease(spec: RulesetSpec, expires_ms: int | None) -> str:
    """One transaction setting the lease: ``None`` held with no expiry, ``> 0`` held for
    that many milliseconds (the kernel lets it lapse by itself), ``<= 0`` lapsed now."""
    out = f"flush set inet {spec.table} {LEASE_SET}\n"
    if expires_ms is not None and expires_ms <= 0:
        return out
    t = "" if expires_ms is None else f" timeout {int(expires_ms)}ms"
    keys = ", ".join(f"{k}{t}" for k in LEASE_KEYS)
    return out + f"add element inet {spec.table} {LEASE_SET} {{ {keys} }}\n"


def render_remove(spec: RulesetSpec) -> str:
    """One transaction deleting both tables (no error when they are already gone)."""
    return (
        f"add table inet {spec.table} {{ flags owner; }}\n"
        f"delete table inet {spec.table}\n"
        f"add table inet {spec.guard_table}\n"
        f"delete table inet {spec.guard_table}\n"
    )


@dataclass(frozen=True)
class Delta:
    """Map elements to delete and to add (each key tuple ascending).

    ``removed``: map name -> keys.  ``added``: (map name, data) -> keys whose new element is
    ``key : data``, data as nft writes it (``host``, ``other`` or ``goto <chain>``).  Every
    deletion comes before every addition: a key whose data changes is deleted and re-added.
    """

    removed: dict[str, tuple[int, ...]]
    added: dict[tuple[str, str], tuple[int, ...]]

    @property
    def removed_count(self) -> int:
        return sum(len(v) for v in self.removed.values())

    @property
    def added_count(self) -> int:
        return sum(len(v) for v in self.added.values())


def bucket_delta(
    spec: RulesetSpec, before: Mapping[str, GroupBuckets], after: Mapping[str, GroupBuckets]
) -> Delta:
    """What changes, map by map, to go from ``before`` to ``after`` (both are validated)."""
    return delta_of_checked(spec, check_state(spec, before), check_state(spec, after))


def delta_of_checked(
    spec: RulesetSpec, b: Mapping[str, GroupBuckets], a: Mapping[str, GroupBuckets]
) -> Delta:
    """:func:`bucket_delta` for states that :func:`check_state` already returned."""
    removed: dict[str, tuple[int, ...]] = {}
    added: dict[tuple[str, str], tuple[int, ...]] = {}
    for g in spec.groups:
        if b[g.name] is a[g.name] or b[g.name] == a[g.name]:
            continue
        old_maps, new_maps = map_contents(g, b[g.name]), map_contents(g, a[g.name])
        for name, old in old_maps.items():
            new = new_maps[name]
            gone: set[int] = set()
            for data, old_keys in old.items():
                new_keys = new[data]
                if old_keys == new_keys:
                    continue
                gone |= old_keys - new_keys  # not in the map any more, or with other data
                if fresh := new_keys - old_keys:
                    added[(name, data)] = tuple(sorted(fresh))
            if gone:
                removed[name] = tuple(sorted(gone))
    return Delta(removed, added)


def render_delta(spec: RulesetSpec, delta: Delta) -> str:
    """The delta as one script: every removal first, then every addition ('' if empty)."""
    lines = [
        f"delete element inet {spec.table} {name} {{ {_elements(v, '  ')} }}"
        for name, v in delta.removed.items()
    ]
    lines += [
        f"add element inet {spec.table} {name} {{ {_map_elements(((k, data) for k in v), '  ')} }}"
        for (name, data), v in delta.added.items()
    ]
    return "".join(line + "\n" for line in lines)


def _json_data(data: str) -> object:
    verb, _, chain = data.partition(" ")
    return {verb: {"target": chain}} if chain else data


def render_delta_json(spec: RulesetSpec, delta: Delta) -> str:
    """The delta in libnftables' JSON command schema ('' if empty).

    Same transaction as :func:`render_delta`; libnftables 1.0.6 parses and evaluates it
    faster than the text form (``nft.Dataplane.update`` falls back to it).
    """
    cmds: list[dict[str, object]] = []
    for name, keys in delta.removed.items():
        elem = {"family": "inet", "table": spec.table, "name": name, "elem": list(keys)}
        cmds.append({"delete": {"element": elem}})
    for (name, data), keys in delta.added.items():
        value = _json_data(data)
        items = [[k, value] for k in keys]
        elem = {"family": "inet", "table": spec.table, "name": name, "elem": items}
        cmds.append({"add": {"element": elem}})
    return json.dumps({"nftables": cmds}, separators=(",", ":")) if cmds else ""


def render_update(
    spec: RulesetSpec, before: Mapping[str, GroupBuckets], after: Mapping[str, GroupBuckets]
) -> str:
    """The atomic delta script from ``before`` to ``after`` ('' when nothing changes)."""
    return render_delta(spec, bucket_delta(spec, before, after))
