"""The lab's switch: a Linux bridge in its own namespace, and how it treats multicast.

Owns: :class:`SwitchMode` (what ``lab up --switch`` chooses) and :class:`Switch` (the bridge's
multicast settings that follow from it).  Must not: create anything (pure; ``lab.wiring``
configures the bridge); docs/switches.md explains the modes and what real switches do.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class SwitchMode(StrEnum):
    """How the switch bridge treats multicast frames; the traffic IP's frames are multicast.

    Frames to the traffic IP carry a multicast MAC but a *unicast* IP destination.  The Linux
    bridge keys its snooping table (mdb) by IP group, so such a frame never matches an mdb
    entry; while a querier exists the bridge sends it to multicast-router ports only, and
    while none exists it floods it to every port (verified on kernel 6.x).
    """

    #: Snooping and the bridge's own querier on (the mdb learns the group from IGMP
    #: reports) and node ports are permanent multicast-router ports, so the traffic IP's
    #: frames reach every node and no client.  The default.
    SNOOPING = "snooping"
    #: Snooping on, no querier: the bridge floods multicast (and the traffic IP) everywhere.
    FLOOD = "flood"
    #: Snooping and querier on, no router ports: the traffic IP's frames reach no node.
    #: Models a snooping switch not configured for the cluster (a failure to demonstrate).
    STRICT = "strict"


@dataclass(frozen=True)
class Switch:
    """The switch: a bridge in its own namespace, one port per host."""

    netns: str
    bridge: str = "br0"
    mode: SwitchMode = SwitchMode.SNOOPING

    @property
    def mcast_snooping(self) -> bool:
        return True

    @property
    def mcast_querier(self) -> bool:
        return self.mode is not SwitchMode.FLOOD

    @property
    def node_ports_mrouter(self) -> bool:
        """Node ports are permanent multicast-router ports (``multicast_router 2``)."""
        return self.mode is SwitchMode.SNOOPING
