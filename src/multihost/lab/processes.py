"""The lab's processes: started in a namespace, recorded, waited for until they listen.

Owns: spawning a lab process (``ip netns exec``, in a session of its own, its output in a log
in the lab's state directory, recorded by PID and start time in the :class:`LabState` at
once), waiting until one runs inside its namespace and listens on a port, and whether a
recorded one still runs.

Must not: decide what runs where (:mod:`multihost.lab.services`, :mod:`multihost.lab.agents`,
:mod:`multihost.lab.backbuild` do) or stop anything (:mod:`multihost.lab.clean` does).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Protocol

import multihost
from multihost.lab.clean import proc_start_time
from multihost.lab.naming import NETNS_DIR
from multihost.lab.state import LabError, LabState, ProcessRecord

READY_TIMEOUT = 15.0
NGINX = "/usr/sbin/nginx"


class _Placed(Protocol):
    """Where a process runs: a host or back end's name and namespace."""

    @property
    def name(self) -> str: ...
    @property
    def netns(self) -> str: ...


def spawn(
    state: LabState, host: _Placed, name: str, argv: list[str], *, match: str
) -> ProcessRecord:
    log = state.directory / f"{name}.log"
    env = dict(os.environ)
    src = str(Path(multihost.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", host.netns, *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives 'lab up', immune to the terminal's ^C
            env=env,
        )
    start = proc_start_time(proc.pid)
    if start is None:
        proc.wait()
        raise LabError(f"{name} exited at once (status {proc.returncode}); see {log}")
    rec = ProcessRecord(name, host.name, host.netns, proc.pid, start, match, argv, str(log))
    state.processes.append(rec)
    state.save()
    return rec


def _netns_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def listening(pid: int, proto: str, port: int) -> bool:
    """Whether ``pid``'s network namespace has a socket bound to ``port`` (TCP: listening)."""
    try:
        lines = Path(f"/proc/{pid}/net/{proto}").read_text().splitlines()[1:]
    except OSError:
        return False
    for line in lines:
        cols = line.split()
        local, st = cols[1], cols[3]
        if int(local.rsplit(":", 1)[1], 16) == port and (proto == "udp" or st == "0A"):
            return True
    return False


def wait_listening(
    rec: ProcessRecord, proto: str, port: int, timeout: float = READY_TIMEOUT
) -> None:
    """Poll until ``rec`` runs inside its namespace and listens on ``port``."""
    want = _netns_inode(str(NETNS_DIR / rec.netns))
    deadline = time.monotonic() + timeout
    while True:
        if proc_start_time(rec.pid) != rec.start_time or _zombie(rec.pid):
            raise LabError(f"{rec.name} exited during start-up: {_tail(rec.log)}")
        in_ns = want is not None and _netns_inode(f"/proc/{rec.pid}/ns/net") == want
        if in_ns and listening(rec.pid, proto, port):
            return
        if time.monotonic() >= deadline:
            raise LabError(f"{rec.name} is not listening on {proto}/{port} after {timeout:.0f}s")
        time.sleep(0.02)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _tail(path: str, lines: int = 3) -> str:
    try:
        text = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return f"(no log {path})"
    return " | ".join(text[-lines:]) or f"(empty log {path})"


def process_alive(rec: ProcessRecord) -> bool:
    return proc_start_time(rec.pid) == rec.start_time and not _zombie(rec.pid)
