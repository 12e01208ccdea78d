"""Failures on purpose: crash a node's agent or cut its link, and undo it.

Owns: ``fail(state, node, how)`` — ``crash`` SIGKILLs the node's agent (verified by PID,
start time and command line; the kernel then drops its owner-flagged table) and ``link``
sets the node's cluster interface down — and ``recover(state, node)``, which restarts the
agent or brings the link back.  Failed nodes are recorded in the state file
(``agents.failed``), so ``lab status`` and later commands know.

Must not: touch anything that is not the lab's (names and PIDs come from the state file).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import Any

from multihost.lab import agents
from multihost.lab.clean import not_ours, proc_start_time
from multihost.lab.processes import spawn
from multihost.lab.state import LabError, LabState

HOWS = ("crash", "link")


def failed(state: LabState) -> dict[str, dict[str, Any]]:
    return dict(state.agents.get("failed") or {})


def _record(state: LabState, node: str) -> dict[str, Any]:
    rec = agents.agent_record(state, node)
    if rec is None:
        raise LabError(f"no agent recorded for node {node}")
    return rec


def _set_link(state: LabState, node: str, up: bool) -> None:
    from pyroute2 import IPRoute

    host = state.topology.host(node)
    with IPRoute(netns=host.netns, flags=0) as ipr:
        idx = ipr.link_lookup(ifname=host.interface)
        if not idx:
            raise LabError(f"node {node}: interface {host.interface} not found")
        ipr.link("set", index=idx[0], state="up" if up else "down")


def fail(state: LabState, node: str, how: str = "crash") -> dict[str, Any]:
    """Fail ``node``; returns ``{"node", "how", "t"}`` (t: time.time() of the failure)."""
    if node not in state.topology.members:
        raise LabError(f"unknown node {node!r} (nodes: {','.join(state.topology.members)})")
    if how not in HOWS:
        raise LabError(f"--how must be one of {', '.join(HOWS)}")
    if node in failed(state):
        raise LabError(f"node {node} is already failed ({failed(state)[node]['how']})")
    if how == "crash":
        rec = _record(state, node)
        pid, start = int(rec["pid"]), int(rec["start_time"])
        reason = not_ours(pid, start, str(rec["match"]))
        if reason is not None:
            raise LabError(f"agent of {node} is not running ({reason})")
        t = time.time()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while proc_start_time(pid) == start and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):  # reap it if it is our child
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.005)
    else:
        t = time.time()
        _set_link(state, node, up=False)
    entry = {"node": node, "how": how, "t": t}
    state.agents.setdefault("failed", {})[node] = entry
    state.live = [m for m in state.live if m != node]  # what the probe predicts with
    state.save()
    return entry


def recover(state: LabState, node: str) -> dict[str, Any]:
    """Undo :func:`fail` for ``node``: restart its agent or bring its link up."""
    entry = failed(state).get(node)
    if entry is None:
        raise LabError(f"node {node} is not failed")
    t = time.time()
    if entry["how"] == "crash":
        rec = _record(state, node)
        host = state.topology.host(node)
        argv = [str(a) for a in rec["argv"]]
        new = spawn(state, host, f"agent-{node}", argv, match=str(rec["match"]))
        state.processes.remove(new)
        for p in state.agents["processes"]:
            if p.get("node") == node:
                p.update(pid=new.pid, start_time=new.start_time, log=new.log)
        state.save()
        agents.wait_ready(state, node)
    else:
        _set_link(state, node, up=True)
    del state.agents["failed"][node]
    state.live = [m for m in state.topology.members if m in state.live or m == node]
    state.save()
    return {"node": node, "how": entry["how"], "t": t}
