"""Configuration of the membership core: one frozen, validated dataclass.

Owns: :class:`MembershipConfig` (cluster and node names, member slots, traffic IP groups,
key, timing, quorum) and its :attr:`~MembershipConfig.wire_digest`, the digest every
heartbeat carries.  The wire digest hashes the caller's ``config_digest`` *and* every
field whose disagreement between nodes would break the safety argument (members, slots,
groups, ``dead_after``, ``takeover_hold``, ``quorum``), so nodes that differ in any of them
see each other as ``mismatch`` whatever the agent passes in.

Must not: read files or TOML (the agent builds this from the parsed configuration), read
clocks or know sockets.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType

from multihost.assignment import PreferenceTable
from multihost.membership.wire import MAX_DIGEST_BYTES, MAX_NAME_BYTES, SLOTS
from multihost.tablechoice import TableChoiceError, table_for

MIN_KEY_BYTES = 16


class MembershipConfigError(ValueError):
    """An invalid membership configuration (the message names the field and value)."""


def _check_name(value: str, what: str) -> None:
    if not isinstance(value, str) or not 1 <= len(value.encode("utf-8")) <= MAX_NAME_BYTES:
        raise MembershipConfigError(f"{what} {value!r} must be 1..{MAX_NAME_BYTES} UTF-8 bytes")


@dataclass(frozen=True)
class MembershipConfig:
    """Everything the core needs; times are in seconds of the caller's monotonic clock.

    * ``members``: member name -> slot 0..15 (unique); ``node`` must be one of them.
    * ``table``: the cluster's preference table over the member slots (default: the one
      :func:`multihost.tablechoice.table_for` picks for the highest slot); every group is
      assigned in it.
    * ``groups``: traffic IP group name -> member names; each group is assigned over the
      slots of its members only (other slots are permanently dead for it).
    * ``interval``: heartbeat period.  ``dead_after``: silence after which a member is dead
      (at least twice the interval).
    * ``takeover_hold``: extra time before taking over from a departed member; leases last
      that much longer, so a crash releases nothing early when it exceeds one interval plus
      two network delays (see docs).  0 gives the fastest failover.
    * ``lease_margin``: the agent must apply a release within this time; leases are given up
      this much before they expire.  It must leave a lease that outlasts the gap between
      two acks: ``lease_margin < dead_after + takeover_hold - 2 * interval``.
    * ``jitter``: bound on a heartbeat's lateness (sender scheduling plus network delay
      spread), assumption A4 of the docs: a peer silent for ``interval + jitter`` is
      *suspect* and need not give us a lease (below ``interval``).
    * ``quorum``: claim nothing unless a majority of the configured members (this node and
      peers holding fresh leases with it) is reachable.
    * ``config_digest``: digest of the ownership-relevant configuration (any bytes, <= 64).
    * ``strict_transitions``: an illegal member-state transition raises (tests) instead of
      being logged and ignored.
    """

    cluster: str
    node: str
    members: Mapping[str, int]
    groups: Mapping[str, frozenset[str]]
    key: bytes = field(repr=False)
    interval: float = 0.2
    dead_after: float = 1.0
    config_digest: bytes = b""
    quorum: bool = False
    takeover_hold: float = 0.0
    lease_margin: float = 0.05
    jitter: float = 0.005
    strict_transitions: bool = True
    table: PreferenceTable | None = None

    def __post_init__(self) -> None:
        _check_name(self.cluster, "cluster name")
        _check_name(self.node, "node name")
        members = dict(self.members)
        if not members:
            raise MembershipConfigError("members: none configured")
        for name, slot in members.items():
            _check_name(name, "member name")
            if not isinstance(slot, int) or not 0 <= slot < SLOTS:
                raise MembershipConfigError(
                    f"member {name!r}: slot {slot!r} outside 0..{SLOTS - 1}"
                )
        slots = list(members.values())
        dup = next((s for s in slots if slots.count(s) > 1), None)
        if dup is not None:
            raise MembershipConfigError(f"slot {dup} is used by more than one member")
        if self.node not in members:
            raise MembershipConfigError(f"node {self.node!r} is not a configured member")
        groups: dict[str, frozenset[str]] = {}
        for gname, names in self.groups.items():
            _check_name(gname, "group name")
            fnames = frozenset(names)
            unknown = sorted(fnames - members.keys())
            if unknown:
                raise MembershipConfigError(f"group {gname!r}: unknown member {unknown[0]!r}")
            if not fnames:
                raise MembershipConfigError(f"group {gname!r} has no members")
            groups[gname] = fnames
        if len(groups) > 8 * 64:
            raise MembershipConfigError(f"{len(groups)} groups configured, at most 512")
        if not isinstance(self.key, bytes) or len(self.key) < MIN_KEY_BYTES:
            raise MembershipConfigError(f"key must be at least {MIN_KEY_BYTES} bytes")
        if len(self.config_digest) > MAX_DIGEST_BYTES:
            raise MembershipConfigError(f"config_digest longer than {MAX_DIGEST_BYTES} bytes")
        for what, value in (
            ("interval", self.interval),
            ("dead_after", self.dead_after),
            ("takeover_hold", self.takeover_hold),
            ("lease_margin", self.lease_margin),
            ("jitter", self.jitter),
        ):
            if not math.isfinite(value) or value < 0:
                raise MembershipConfigError(f"{what} {value!r} must be finite and >= 0")
        if self.interval <= 0:
            raise MembershipConfigError("interval must be > 0")
        if self.dead_after < 2 * self.interval:
            raise MembershipConfigError(
                f"dead_after {self.dead_after} must be at least twice the interval"
            )
        window = self.dead_after + self.takeover_hold - 2 * self.interval
        if not 0 < self.lease_margin < window:
            raise MembershipConfigError(
                f"lease_margin {self.lease_margin} must be > 0 and below dead_after + "
                f"takeover_hold - 2 x interval ({window:.6g}): a lease must outlast the gap "
                "between two acks"
            )
        if self.jitter >= self.interval:
            raise MembershipConfigError(f"jitter {self.jitter} must be below the interval")
        table = self.table
        if table is None:
            try:
                table = table_for(max(slots) + 1)
            except TableChoiceError as e:
                raise MembershipConfigError(f"slot {max(slots)}: {e}") from None
        if max(slots) >= table.slots:
            raise MembershipConfigError(
                f"slot {max(slots)} is outside the table's 0..{table.slots - 1}"
            )
        object.__setattr__(self, "table", table)
        object.__setattr__(self, "members", MappingProxyType(members))
        object.__setattr__(self, "groups", MappingProxyType(groups))

    @property
    def slot(self) -> int:
        return self.members[self.node]

    @property
    def ownership_table(self) -> PreferenceTable:
        """The table (always set after validation)."""
        assert self.table is not None
        return self.table

    @property
    def min_send_gap(self) -> float:
        """Shortest gap between two heartbeats (early sends after a change)."""
        return self.interval / 8

    @cached_property
    def wire_digest(self) -> bytes:
        """SHA-256 over the caller's digest and the safety-relevant fields (see module doc)."""
        h = hashlib.sha256(b"multihost-membership-v2\0")
        h.update(len(self.config_digest).to_bytes(1, "big") + self.config_digest)
        t = self.ownership_table
        name = getattr(t, "name", type(t).__name__)
        h.update(f"table\0{name}\0{t.slots}\0{t.buckets}\n".encode())
        for name in sorted(self.members):
            h.update(f"member\0{name}\0{self.members[name]}\n".encode())
        for gname in sorted(self.groups):
            h.update(f"group\0{gname}\0{','.join(sorted(self.groups[gname]))}\n".encode())
        h.update(f"dead_after\0{self.dead_after!r}\n".encode())
        h.update(f"takeover_hold\0{self.takeover_hold!r}\n".encode())
        h.update(f"quorum\0{self.quorum}\n".encode())
        return h.digest()
