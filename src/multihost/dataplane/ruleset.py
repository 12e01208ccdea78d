"""Pure rendering of the node's nftables scripts (text for ``nft -f`` / libnftables).

Owns: the shape of the two tables, the names of their sets, chains and counters, the hash
expression (derived from :func:`multihost.flowhash.hash_fields`, so the rule and the model
cannot drift), validation of specs and bucket states, and bucket deltas between two states.

Must not: run anything (no subprocess, sockets, ctypes or clocks); ``nft.Dataplane`` applies
what this module renders.

Tables
------
``multihost_guard`` (static, not owner-flagged), hook prerouting priority -250, i.e. after
the owned table's -300 chain and before conntrack (-200): drops packets to a traffic IP whose
``meta pkttype`` is not ``host``.  Clients reach a traffic IP through a *multicast* MAC, so
such packets arrive as ``multicast``; only the owned table turns the buckets this node
serves into ``host``.  When the owning process dies the kernel deletes the owned table and
the guard drops everything to the traffic IPs: UDP fails closed too (TCP would already drop
non-host packets itself).  Its ``ct`` rule is a deliberate no-op that makes this netns use
conntrack, which enables IPv4/IPv6 defragmentation at priority -400: the -300 chain then
hashes reassembled datagrams, not fragments without ports.

``multihost`` (``flags owner``: belongs to the netlink socket of the agent's libnftables
context), per group three bucket sets ``<group>_owned``, ``<group>_draining`` and
``<group>_incoming`` and two named counters ``<group>_accepted`` / ``<group>_dropped``:

* chain ``hook_raw`` (priority -300, before conntrack): a packet to a traffic IP whose bucket is
  in any of the three sets gets ``meta pkttype set host`` (without it TCP discards the
  L2-multicast packet) and is accepted; any other packet to the traffic IP is dropped.
* chain ``hook_ct`` (priority -150, after conntrack): ``owned`` is accepted.  ``draining`` (the
  bucket is leaving this node): TCP only ``ct state established,related``.  ``incoming``
  (the bucket is arriving): TCP ``established,related`` or a pure SYN (``syn`` without
  ``ack|fin|rst``) in ``ct state new``.  The rest of those two sets is dropped.

  UDP, SCTP, DCCP, UDP-Lite and port-less protocols do not take part in the graceful
  handover: ``draining`` accepts them like ``owned`` and ``incoming`` only with
  ``ct state established,related``.  A node cannot tell a UDP flow that is new to the
  cluster from one that is live on the old owner (``ct state new`` is local), so accepting
  ``new`` on the incoming node would deliver every live UDP flow to two nodes at once (a
  QUIC server answering with stateless resets).  Keeping them with the old owner until the
  bucket moves to ``owned`` preserves "exactly one node per packet" at every instant.

Flows: tcp/udp/sctp/dccp/udplite hash ``hash_fields(mode, has_ports=True)`` (``th sport`` /
``th dport``); other protocols, ICMP echo included, ``hash_fields(mode, has_ports=False)``,
so a ping is answered by exactly one node.  ICMP errors (destination-unreachable,
time-exceeded, parameter-problem; ICMPv6 also packet-too-big) to a traffic IP go to *every*
node: the owner needs them (PMTU discovery), the others have no socket for the embedded flow
and ignore them, and hashing the embedded inner header instead would need a second,
fragile parser.  ICMPv6 neighbour discovery to a traffic IP (unicast NUD probes, redirects)
goes to every node too.  Packets arriving on loopback (the node talking to its own traffic
IP) are not filtered.

Set key: ``typeof meta length`` with ``size B``: a 32-bit host-order integer, exactly the
register ``jhash`` writes.  nft 1.0.6 refuses ``type integer`` for sets.  A 16-bit key
(``typeof ct zone``) makes the kernel choose its bitmap set, whose insert and delete scan a
list of all elements (``nft_bitmap_elem_find``): 20,000 elements take ~1.4 s to add on
kernel 6.18, far beyond the 20 ms update goal.  With 32 bits and a fixed ``size`` the kernel
picks its fixed-size hash: O(1) per element update, and a per-packet lookup measured at
about the bitmap's cost.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from multihost.flowhash import HashMode, hash_fields

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


@dataclass(frozen=True)
class RulesetSpec:
    """Everything about the ruleset except which buckets this node serves."""

    buckets: int
    seed: int
    groups: tuple[GroupSpec, ...]
    table: str = "multihost"
    guard_table: str = "multihost_guard"

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


def set_names(group: GroupSpec) -> dict[str, str]:
    """Kind (``owned``/``draining``/``incoming``) -> nft set name."""
    return {k: f"{group.name}_{k}" for k in SET_KINDS}


def counter_names(group: GroupSpec) -> dict[str, str]:
    """``accepted`` / ``dropped`` -> nft named counter."""
    return {k: f"{group.name}_{k}" for k in ("accepted", "dropped")}


@functools.lru_cache(maxsize=4)
def _all_buckets(buckets: int) -> frozenset[int]:
    return frozenset(range(buckets))


def _in_range(members: frozenset[int], buckets: int) -> bool:
    if buckets <= 1 << 20:  # a subset test is twice as fast as min() + max()
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


def jhash_expr(spec: RulesetSpec, group: GroupSpec, family: int, has_ports: bool) -> str:
    """The nft hash expression for a group's packets of one family and protocol class."""
    fields = " . ".join(_FIELDS[family][f] for f in hash_fields(group.hash_mode, has_ports))
    return f"jhash {fields} mod {spec.buckets} seed {spec.seed:#x}"


def _elements(values: Iterable[int], indent: str) -> str:
    ordered = sorted(values)
    lines = [
        ", ".join(str(v) for v in ordered[i : i + _ELEMENTS_PER_LINE])
        for i in range(0, len(ordered), _ELEMENTS_PER_LINE)
    ]
    return (",\n" + indent).join(lines)


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


def _group_chains(spec: RulesetSpec, g: GroupSpec, family: int) -> list[str]:
    """The four chains of one group and family (``raw``, ``raw ports``, ``ct``, ``ct tcp``)."""
    sets = {k: f"@{n}" for k, n in set_names(g).items()}
    cnt = counter_names(g)
    acc = f'counter name "{cnt["accepted"]}" accept'
    drop = f'counter name "{cnt["dropped"]}" drop'
    est = "ct state established,related"
    f = _fam(family)
    base = f"{g.name}_raw{f}"
    ctc = f"{g.name}_ct{f}"
    h = jhash_expr(spec, g, family, has_ports=False)
    hp = jhash_expr(spec, g, family, has_ports=True)
    host = "meta pkttype set host accept"
    ports = ", ".join(PORT_PROTOCOLS)
    other_ports = ", ".join(p for p in PORT_PROTOCOLS if p != "tcp")

    raw = [
        f"{_to_all(family)} {host}",
        f"meta l4proto {{ {ports} }} goto {base}_ports",
        *(f"{h} {sets[k]} {host}" for k in SET_KINDS),
        drop,
    ]
    raw_ports = [*(f"{hp} {sets[k]} {host}" for k in SET_KINDS), drop]

    def not_tcp(expr: str) -> list[str]:
        # UDP & co. and port-less protocols: draining acts as owned, incoming only est/rel.
        return [
            f"{expr} {sets['owned']} {acc}",
            f"{expr} {sets['draining']} {acc}",
            f"{expr} {sets['incoming']} {est} {acc}",
            drop,
        ]

    ct = [
        f"{_to_all(family)} {acc}",
        f"meta l4proto tcp goto {ctc}_tcp",
        f"meta l4proto {{ {other_ports} }} goto {ctc}_ports",
        *not_tcp(h),
    ]
    syn = "tcp flags & (fin | syn | rst | ack) == syn ct state new"
    ct_tcp = [
        f"{hp} {sets['owned']} {acc}",
        f"{hp} {sets['draining']} {est} {acc}",
        f"{hp} {sets['incoming']} {est} {acc}",
        f"{hp} {sets['incoming']} {syn} {acc}",
        drop,
    ]
    out: list[str] = []
    for name, rules in (
        (base, raw),
        (f"{base}_ports", raw_ports),
        (ctc, ct),
        (f"{ctc}_tcp", ct_tcp),
        (f"{ctc}_ports", not_tcp(hp)),
    ):
        out += ["", *_chain(name, rules)]
    return out


def _dispatch(spec: RulesetSpec, kind: str) -> list[str]:
    rules = ["meta iiftype loopback accept"]
    for g in spec.groups:
        for family in (4, 6):
            addrs = g.family_addresses(family)
            if addrs:
                rules.append(f"{_addr_match(family, addrs)} goto {g.name}_{kind}{_fam(family)}")
    return rules


def render_owned_table(spec: RulesetSpec, state: Mapping[str, GroupBuckets]) -> str:
    """The complete owned table (``flags owner``) holding ``state``."""
    spec.check()
    full = check_state(spec, state)
    lines = [f"table inet {spec.table} {{", "\tflags owner"]
    for g in spec.groups:
        lines.append("")
        for c in counter_names(g).values():
            lines += [f"\tcounter {c} {{", "\t}"]
        for kind, name in set_names(g).items():
            lines += [f"\tset {name} {{", "\t\ttypeof meta length", f"\t\tsize {spec.buckets}"]
            members = full[g.name].of(kind)
            if members:
                indent = "\t\t\t"
                lines.append(f"\t\telements = {{\n{indent}{_elements(members, indent)}\n\t\t}}")
            lines.append("\t}")
    hook = "type filter hook prerouting priority {}; policy accept;"
    lines += ["", *_chain("hook_raw", _dispatch(spec, "raw"), hook.format(PRIORITY_RAW))]
    lines += ["", *_chain("hook_ct", _dispatch(spec, "ct"), hook.format(PRIORITY_CT))]
    for g in spec.groups:
        for family in (4, 6):
            if g.family_addresses(family):
                lines += _group_chains(spec, g, family)
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_guard_table(spec: RulesetSpec) -> str:
    """The static guard table: drop non-``host`` packets to any traffic IP."""
    spec.check()
    rules = [
        'ct state invalid continue comment "uses conntrack: defragmentation before -300"',
    ]
    for family in (4, 6):
        addrs = tuple(a for g in spec.groups for a in g.family_addresses(family))
        if addrs:
            rules.append(
                f'{_addr_match(family, addrs)} meta pkttype != host counter name "dropped" drop'
            )
    hook = f"type filter hook prerouting priority {PRIORITY_GUARD}; policy accept;"
    lines = [f"table inet {spec.guard_table} {{", "\tcounter dropped {", "\t}", ""]
    lines += _chain("prerouting", rules, hook)
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
    """Set elements to remove and to add, per nft set name (each tuple ascending)."""

    removed: dict[str, tuple[int, ...]]
    added: dict[str, tuple[int, ...]]

    @property
    def removed_count(self) -> int:
        return sum(len(v) for v in self.removed.values())

    @property
    def added_count(self) -> int:
        return sum(len(v) for v in self.added.values())


def bucket_delta(
    spec: RulesetSpec, before: Mapping[str, GroupBuckets], after: Mapping[str, GroupBuckets]
) -> Delta:
    """What changes, set by set, to go from ``before`` to ``after`` (both are validated)."""
    return delta_of_checked(spec, check_state(spec, before), check_state(spec, after))


def delta_of_checked(
    spec: RulesetSpec, b: Mapping[str, GroupBuckets], a: Mapping[str, GroupBuckets]
) -> Delta:
    """:func:`bucket_delta` for states that :func:`check_state` already returned."""
    removed: dict[str, tuple[int, ...]] = {}
    added: dict[str, tuple[int, ...]] = {}
    for g in spec.groups:
        for kind, name in set_names(g).items():
            old, new = b[g.name].of(kind), a[g.name].of(kind)
            if old is new or old == new:
                continue
            if gone := old - new:
                removed[name] = tuple(sorted(gone))
            if fresh := new - old:
                added[name] = tuple(sorted(fresh))
    return Delta(removed, added)


def render_delta(spec: RulesetSpec, delta: Delta) -> str:
    """The delta as one script: every removal first, then every addition ('' if empty)."""
    lines = [
        f"delete element inet {spec.table} {name} {{ {_elements(v, '  ')} }}"
        for name, v in delta.removed.items()
    ]
    lines += [
        f"add element inet {spec.table} {name} {{ {_elements(v, '  ')} }}"
        for name, v in delta.added.items()
    ]
    return "".join(line + "\n" for line in lines)


def render_delta_json(spec: RulesetSpec, delta: Delta) -> str:
    """The delta in libnftables' JSON command schema ('' if empty).

    Same transaction as :func:`render_delta`; libnftables 1.0.6 parses and evaluates it in
    about 60% of the time of the text form (``nft.Dataplane.update`` falls back to it).
    """
    cmds: list[dict[str, object]] = []
    for verb, changes in (("delete", delta.removed), ("add", delta.added)):
        for name, values in changes.items():
            elem = {"family": "inet", "table": spec.table, "name": name, "elem": list(values)}
            cmds.append({verb: {"element": elem}})
    return json.dumps({"nftables": cmds}, separators=(",", ":")) if cmds else ""


def render_update(
    spec: RulesetSpec, before: Mapping[str, GroupBuckets], after: Mapping[str, GroupBuckets]
) -> str:
    """The atomic delta script from ``before`` to ``after`` ('' when nothing changes)."""
    return render_delta(spec, bucket_delta(spec, before, after))
