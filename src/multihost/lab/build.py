"""Build a described lab (all-or-nothing) and tear it down.

Owns: the order of the build steps and running them all or nothing (the namespaces, the
switch and the hosts' links: :mod:`multihost.lab.wiring`; the nodes' services:
:mod:`multihost.lab.services`; a router or back-end network: :mod:`multihost.lab.backbuild`;
the agents: :func:`multihost.lab.agents.start_agents`), saving the lab's state file
(:mod:`multihost.lab.state`) after every step, so that :func:`multihost.lab.clean.clean` can
remove a half-built lab even after a crash; tearing a lab down; and changing its live set.

Must not: put the traffic IP on a node, install the data plane's nft rules or answer ARP
(the agent does),
touch the root namespace's links, routes or firewall, or leave anything behind when a build
fails: :func:`build` tears down what it made and raises :class:`~multihost.lab.state.LabError`
naming the step.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable

from multihost.lab import agents, backbuild, services
from multihost.lab.clean import CleanReport, lab_namespaces, recorded_processes, remove_lab
from multihost.lab.naming import state_dir
from multihost.lab.state import LabError, LabState, require_root
from multihost.lab.topology import Topology
from multihost.lab.wiring import configure_switch, create_namespaces, wait_dad, wire_hosts

# --- build ------------------------------------------------------------------------------

StepHook = Callable[[str], None]


def build(
    topology: Topology,
    progress: StepHook | None = None,
    *,
    manual: bool = False,
    with_agents: bool = True,
    heartbeat_ms: int | None = None,
    dead_after_ms: int | None = None,
    metrics: bool = False,
    quorum: bool = False,
    max_drain_ms: int | None = None,
    backend: str = "auto",
) -> LabState:
    """Create the lab, start its services and agents; all or nothing.

    ``heartbeat_ms``/``dead_after_ms``/``metrics``/``quorum``/``max_drain_ms``/``backend``:
    see :func:`agents.start_agents`.

    Raises :class:`LabError` if a lab with the prefix exists or a step fails; in the
    latter case everything built so far has been removed before the error is raised.
    """
    require_root()
    prefix = topology.prefix
    leftovers = lab_namespaces(prefix)
    if state_dir(prefix).exists() or leftovers:
        what = f"namespaces {', '.join(leftovers)}" if leftovers else str(state_dir(prefix))
        raise LabError(
            f"a lab with prefix {prefix!r} already exists ({what}); "
            "run 'multihost lab down' (or 'multihost lab clean' if it is broken) first"
        )
    state_dir(prefix).parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        state_dir(prefix).mkdir(mode=0o755)
    except FileExistsError:
        raise LabError(f"a lab with prefix {prefix!r} is being built by another process") from None
    state = LabState(
        topology=topology,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        builder_pid=os.getpid(),
        live=list(topology.members),
        agents={"manual": manual},
    )
    timing: dict[str, object] = {
        "heartbeat_ms": heartbeat_ms,
        "dead_after_ms": dead_after_ms,
        "metrics": metrics,
    }
    timing.update(quorum=quorum, max_drain_ms=max_drain_ms, backend=backend)
    state.agents.update({k: v for k, v in timing.items() if v})
    steps: list[tuple[str, Callable[[LabState], None]]] = [
        ("creating namespaces", create_namespaces),
        ("configuring the switch", configure_switch),
        ("wiring hosts to the switch", wire_hosts),
        ("starting nginx and the UDP echo service", _start_services),
        ("waiting for IPv6 duplicate address detection", wait_dad),
        ("starting the agents", _start_agents),
    ]
    if not with_agents:  # the bare network (tests of the switch itself)
        steps.pop()
    steps[3:3] = backbuild.network_steps(topology)  # router, back-end network (or none)
    if with_agents:
        steps += backbuild.service_steps(topology)
    try:
        state.save()
        for step, func in steps:
            state.step = step
            if progress is not None:
                progress(step)
            func(state)
            state.save()
        state.status = "up"
        state.step = ""
        state.save()
    except BaseException as e:
        report = teardown(state, strict=False)
        if report.errors:
            undone = "clean-up FAILED (try 'multihost lab clean'): " + "; ".join(report.errors)
        else:
            undone = "everything built was removed"
        if not isinstance(e, Exception):
            raise
        what = str(e) if isinstance(e, LabError) else f"{type(e).__name__}: {e}"
        raise LabError(f"lab up failed while {state.step}: {what}; {undone}") from e
    return state


def _start_services(state: LabState) -> None:
    services.start_services(state)


def _start_agents(state: LabState) -> None:
    a = state.agents
    manual = bool(a.get("manual", False))
    result = agents.start_agents(
        state.topology,
        state,
        manual=manual,
        interval_ms=a.get("heartbeat_ms"),
        dead_after_ms=a.get("dead_after_ms"),
        metrics=bool(a.get("metrics", False)),
        quorum=bool(a.get("quorum", False)),
        max_drain_ms=a.get("max_drain_ms"),
        backend=str(a.get("backend") or "auto"),
    )
    state.agents = dict(result or {})


# --- teardown and live set -------------------------------------------------------------


def teardown(state: LabState, strict: bool = True) -> CleanReport:
    """Stop every recorded process (agents first), delete the namespaces and the state dir.

    With ``strict``, raises :class:`LabError` if anything could not be removed.
    """
    records = recorded_processes(
        {"processes": [p.to_dict() for p in state.processes], "agents": state.agents}
    )
    report = remove_lab(state.prefix, records, state.namespaces)
    if strict and report.errors:
        raise LabError("lab down left things behind: " + "; ".join(report.errors))
    return report


def set_live(state: LabState, live: list[str]) -> None:
    """Tell the agents the new live set (:func:`agents.push_live`), then record it."""
    unknown = [n for n in live if n not in state.topology.members]
    if unknown:
        members = ",".join(state.topology.members)
        raise LabError(f"unknown node {unknown[0]!r} (nodes: {members})")
    if len(set(live)) != len(live):
        raise LabError("a node is listed twice")
    agents.push_live(state, list(live))
    state.live = [m for m in state.topology.members if m in live]
    state.save()
