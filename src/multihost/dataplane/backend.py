"""Choosing and starting the node's data plane: the XDP program or the nft tables.

Owns: the backend-neutral interface the agent programs (:class:`Backend`), the pin
directory of a node, and ``[cluster] dataplane``: ``"xdp"`` (refuse to start without it),
``"nft"``, or ``"auto"`` -- XDP when this kernel, the built object and the interface allow
it, else nft, with the reason (:func:`start`).  Starting nft also removes an XDP program
multihost left attached to the interface (a killed agent's), so the two never filter at once.

Must not: decide ownership; it only builds, installs and hands back the chosen backend.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from multihost.dataplane.libbpf import BpfError
from multihost.dataplane.nft import Dataplane, UpdateStats
from multihost.dataplane.ruleset import GroupBuckets, RulesetSpec
from multihost.dataplane.xdp import XdpDataplane
from multihost.dataplane.xdpattach import cleanup
from multihost.dataplane.xdpobject import XdpError, unavailable_reason

Row = tuple[str, int, str, int, int, int | None]  # conntrack.Row


class Backend(Protocol):
    """What the agent calls on either data plane (nft.Dataplane, xdp.XdpDataplane)."""

    backend: str
    #: ``set_lease`` is one bounded map write, safe on the event loop (XDP; nft: False).
    lease_inline: bool

    def install(
        self, state: Mapping[str, GroupBuckets], spec: RulesetSpec | None = None
    ) -> float: ...
    def update(self, state: Mapping[str, GroupBuckets]) -> UpdateStats: ...
    def set_lease(self, expires_ms: int | None) -> None: ...
    def lease_held(self) -> bool: ...
    def read_state(self) -> dict[str, GroupBuckets]: ...
    def counters(self) -> dict[str, dict[str, int]]: ...
    def flow_rows(self) -> list[Row]: ...
    def describe(self) -> dict[str, Any]: ...
    def remove(self) -> None: ...
    def close(self) -> None: ...


def pin_dir(root: Path, cluster: str, node: str) -> Path:
    """Where a node's XDP program and maps are pinned: ``<root>/<cluster>-<node>``."""
    return root / f"{cluster}-{node}"


@dataclass(frozen=True)
class Started:
    backend: Backend
    reason: str  # why this backend (for the one log line)


def start(
    spec: RulesetSpec,
    state: Mapping[str, GroupBuckets],
    *,
    choice: str,
    interface: str,
    pins: Path,
    xdp_mode: str = "auto",
    netns: str | None = None,
    obj: Path | None = None,
) -> Started:
    """Build and install the chosen backend with ``state``.  ``choice="xdp"``: raises
    :class:`XdpError` naming what is missing; ``"auto"``: falls back to nft and says why."""
    if choice not in ("auto", "xdp", "nft"):
        raise XdpError(f"dataplane {choice!r}: use auto, xdp or nft")
    reason = 'configured (dataplane = "nft")'
    if choice != "nft":
        missing = unavailable_reason() if obj is None else unavailable_reason(obj)
        if missing is None:
            kw = {} if obj is None else {"obj": obj}
            xdp = XdpDataplane(spec, interface, pins, netns=netns, mode=xdp_mode, **kw)
            try:
                xdp.install(state)
                mode = xdp.describe()["mode"]
                why = (
                    "configured"
                    if choice == "xdp"
                    else "auto: kernel, object and interface allow it"
                )
                return Started(xdp, f"{why} ({mode} mode on {interface})")
            except (XdpError, BpfError) as e:
                xdp.close()
                missing = str(e)
        if choice == "xdp":
            raise XdpError(f'dataplane = "xdp" cannot run here: {missing}')
        reason = f"auto: xdp unavailable: {missing}"
    extra = tuple(sorted({r.interface for r in spec.returns} - {interface}))
    _remove_stale_xdp(interface, pins, netns, extra)
    nft = Dataplane(spec)
    nft.install(state)
    return Started(nft, reason)


def _remove_stale_xdp(
    interface: str, pins: Path, netns: str | None, extra: tuple[str, ...] = ()
) -> None:
    # no libbpf, no permission: nothing of ours can be attached
    with contextlib.suppress(BpfError, OSError):
        cleanup(interface, pins, netns, extra)
