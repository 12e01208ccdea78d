"""Pure rendering of the node's nftables tables (text for ``nft -f`` / libnftables).

Owns: the shape of the owned and guard tables (below), the hash expression (derived from
:func:`multihost.flowhash.hash_fields`, so the rule and the model cannot drift), the scripts
that install both tables, set the lease and remove both tables, the static table of IP
transparency (:func:`render_transparent_table`), and the nft spelling of element lists
(:func:`key_list`, :func:`element_list`, shared with :mod:`.rulesetdelta`).

Must not: run anything (no subprocess, sockets, ctypes or clocks); ``nft.Dataplane`` applies
what this module renders.  Specs, bucket states and the names of maps, chains and counters
are :mod:`.ruleset`'s; the bucket updates between two states are :mod:`.rulesetdelta`'s.

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
an element's data; :mod:`.rulesetdelta`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from multihost.dataplane.ruleset import (
    HANDOVER_TAG,
    LEASE_KEYS,
    LEASE_SET,
    GroupBuckets,
    GroupSpec,
    IPAddress,
    ReturnSpec,
    RulesetError,
    RulesetSpec,
    bucket_map,
    check_state,
    check_table_name,
    counter_names,
    handover_map,
    kind_chains,
    map_contents,
)
from multihost.flowhash import hash_fields

PRIORITY_RAW = -300
PRIORITY_GUARD = -250
PRIORITY_CT = -150
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
_FIELDS = {
    4: {"saddr": "ip saddr", "daddr": "ip daddr", "sport": "th sport", "dport": "th dport"},
    6: {"saddr": "ip6 saddr", "daddr": "ip6 daddr", "sport": "th sport", "dport": "th dport"},
}
_ELEMENTS_PER_LINE = 16


def jhash_expr(
    spec: RulesetSpec, group: GroupSpec | ReturnSpec, family: int, has_ports: bool
) -> str:
    """The nft hash expression for a group's packets of one family and protocol class."""
    fields = " . ".join(_FIELDS[family][f] for f in hash_fields(group.hash_mode, has_ports))
    return f"jhash {fields} mod {spec.buckets} seed {spec.seed:#x}"


def _lines(items: list[str], per_line: int, indent: str) -> str:
    lines = [", ".join(items[i : i + per_line]) for i in range(0, len(items), per_line)]
    return (",\n" + indent).join(lines)


def key_list(values: Iterable[int], indent: str) -> str:
    """Set keys, ascending, comma-separated; a new line, then ``indent``, after every 16."""
    return _lines([str(v) for v in sorted(values)], _ELEMENTS_PER_LINE, indent)


def element_list(items: Iterable[tuple[int, str]], indent: str) -> str:
    """``key : data`` map elements, ascending by key, wrapped as :func:`key_list` does."""
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
                lines.append(f"\t\telements = {{\n{indent}{element_list(items, indent)}\n\t\t}}")
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
    check_table_name(table)
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
