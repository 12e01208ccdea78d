"""Effects the membership core asks its driver (the agent, or the simulator) to perform.

Owns: the effect types (:class:`Send`, :class:`ViewChanged`, :class:`ClaimsChanged`,
:class:`Rejected`, :class:`Log`), the rejection reasons, and the :class:`Counters`
snapshot.

Must not: perform I/O.  Effects are plain values; the driver sends, logs and programs the
kernel, then reports back (``MembershipCore.applied``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Final, Literal

import numpy as np

from multihost.assignment import merge_ranges
from multihost.membership.ownership import BoolArray
from multihost.membership.wire import WIRE_REASONS

LogLevel = Literal["debug", "info", "warning", "error"]

# Every reason a datagram can be rejected for: the wire reasons, then the protocol ones.
REJECT_REASONS: Final[tuple[str, ...]] = (
    *WIRE_REASONS,
    "other-cluster",  # authenticated, but another cluster name
    "unknown-sender",  # name not configured, or name and slot disagree with the config
    "replay",  # sequence not newer for that incarnation, or an old incarnation
    "digest-mismatch",  # another configuration digest (the sender is shown as mismatch)
    "self",  # our own heartbeat looped back (another boot id is logged as an error)
)


@dataclass(frozen=True)
class Send:
    """Multicast ``payload`` to the cluster group."""

    payload: bytes


@dataclass(frozen=True)
class ViewChanged:
    """The members this node now believes alive (itself included)."""

    live: frozenset[str]


@dataclass(frozen=True, eq=False)
class ClaimsChanged:
    """Serve exactly these buckets per traffic IP group (groups this node belongs to).

    The driver programs the kernel (releases take effect within ``lease_margin``), then
    calls ``MembershipCore.applied(epoch, now)``.  Until then heartbeats keep advertising
    the previously applied claims as well, so no peer takes what might still be served.
    """

    epoch: int
    masks: Mapping[str, BoolArray]  # read-only boolean arrays of length B

    @cached_property
    def claims(self) -> Mapping[str, frozenset[int]]:
        return {g: frozenset(np.flatnonzero(m).tolist()) for g, m in self.masks.items()}

    def ranges(self, group: str) -> tuple[tuple[int, int], ...]:
        """Merged inclusive ``(lo, hi)`` bucket ranges of ``group``."""
        return merge_ranges(np.flatnonzero(self.masks[group]).tolist())

    def counts(self) -> dict[str, int]:
        return {g: int(np.count_nonzero(m)) for g, m in self.masks.items()}


@dataclass(frozen=True)
class Rejected:
    """A datagram was dropped (counted; never changes membership)."""

    reason: str
    sender: str | None


@dataclass(frozen=True)
class Log:
    """A structured log line: rare, state-changing events only (never per heartbeat)."""

    level: LogLevel
    event: str
    fields: Mapping[str, object] = field(default_factory=dict)


Effect = Send | ViewChanged | ClaimsChanged | Rejected | Log


@dataclass(frozen=True)
class Counters:
    """Heartbeat counters since the core started."""

    sent: int
    received: int  # datagrams handed to receive()
    accepted: int  # valid heartbeats from members with our digest
    rejected: Mapping[str, int]  # by reason (every reason present, zero included)
