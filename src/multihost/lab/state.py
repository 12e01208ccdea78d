"""A lab's state file: what it created and started, saved after every step; and LabError.

Owns: :class:`LabState` and :class:`ProcessRecord` and their JSON form, the state file
``/run/multihost-lab/<prefix>/state.json`` (:meth:`LabState.save`, :func:`load_state`),
:class:`LabError` (a lab operation failed; every lab module raises it) and
:func:`require_root`.

Must not: create or remove namespaces, links or processes (:mod:`multihost.lab.build` does,
and records them here; :mod:`multihost.lab.clean` removes what a state file names).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from multihost.lab.naming import TopologyError, state_dir
from multihost.lab.topology import Topology

STATE_FORMAT = 1


class LabError(Exception):
    """A lab operation failed (the message says which step and why); exit status 1."""


@dataclass
class ProcessRecord:
    """A process the lab started; ``match`` must appear in its command line to be stopped."""

    name: str
    host: str
    netns: str
    pid: int
    start_time: int
    match: str
    argv: list[str]
    log: str
    cmdline: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class LabState:
    """Everything a lab created or started, as saved in ``state.json``."""

    topology: Topology
    status: str = "building"  # "building" | "up"
    created: str = ""
    builder_pid: int = 0
    live: list[str] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    processes: list[ProcessRecord] = field(default_factory=list)
    agents: dict[str, Any] = field(default_factory=dict)
    step: str = ""

    @property
    def prefix(self) -> str:
        return self.topology.prefix

    @property
    def directory(self) -> Path:
        return state_dir(self.prefix)

    @property
    def path(self) -> Path:
        return self.directory / "state.json"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "prefix": self.prefix,
            "status": self.status,
            "step": self.step,
            "created": self.created,
            "builder_pid": self.builder_pid,
            "state_dir": str(self.directory),
            "topology": self.topology.to_dict(),
            "live": list(self.live),
            "namespaces": list(self.namespaces),
            "processes": [p.to_dict() for p in self.processes],
            "agents": self.agents,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LabState:
        try:
            if d.get("format") != STATE_FORMAT:
                raise LabError(f"state format {d.get('format')!r} is not {STATE_FORMAT}")
            return cls(
                topology=Topology.from_dict(d["topology"]),
                status=str(d["status"]),
                created=str(d["created"]),
                builder_pid=int(d["builder_pid"]),
                live=[str(x) for x in d["live"]],
                namespaces=[str(x) for x in d["namespaces"]],
                processes=[ProcessRecord(**p) for p in d["processes"]],
                agents=dict(d.get("agents") or {}),
                step=str(d.get("step", "")),
            )
        except (KeyError, TypeError, ValueError, TopologyError) as e:
            raise LabError(f"malformed lab state: {e}") from None

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, self.path)


def load_state(prefix: str) -> LabState | None:
    """The saved state of the lab with ``prefix``, None if there is none."""
    try:
        text = (state_dir(prefix) / "state.json").read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise LabError(f"{state_dir(prefix)}/state.json is not JSON ({e})") from None
    return LabState.from_dict(data)


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces); run it with sudo")
