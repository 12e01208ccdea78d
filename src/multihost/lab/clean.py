"""Remove every leftover of a lab with a given prefix, even after a crash.  Idempotent.

Owns: process identity checks (a PID is stopped only if its start time, read from
``/proc/<pid>/stat``, equals the recorded one and its command line contains the recorded
marker, so a reused PID is never signalled), stopping recorded processes, finding processes
still inside a lab namespace (orphaned nginx workers, ``lab exec`` shells), deleting the
lab's namespaces and its state directory, and reporting what was removed.

Must not: touch a namespace whose name does not match :func:`naming.netns_pattern`
exactly (``<prefix>sw``, ``<prefix>A``..``H``, ``<prefix>c1``..``c8``), a path other than
``/run/multihost-lab/<prefix>``, or a process that is neither recorded by this lab nor
inside one of its namespaces.  Never kills by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from multihost.lab.naming import NETNS_DIR, netns_pattern, state_dir, state_file

STOP_TIMEOUT = 5.0
KILL_TIMEOUT = 3.0


@dataclass
class CleanReport:
    """What a clean-up (``lab clean``, ``lab down`` or a failed build) did."""

    prefix: str
    stopped: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def removed_anything(self) -> bool:
        return bool(self.stopped or self.namespaces or self.paths)

    def to_dict(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "stopped": self.stopped,
            "skipped": self.skipped,
            "namespaces": self.namespaces,
            "paths": self.paths,
            "errors": self.errors,
        }

    def lines(self) -> list[str]:
        out = [f"stopped {s}" for s in self.stopped]
        out += [f"left alone {s}" for s in self.skipped]
        out += [f"deleted namespace {n}" for n in self.namespaces]
        out += [f"removed {p}" for p in self.paths]
        out += [f"FAILED: {e}" for e in self.errors]
        return out


# --- processes -------------------------------------------------------------------------


def proc_stat(pid: int) -> tuple[str, int] | None:
    """``(state, starttime)`` of ``pid`` from ``/proc/<pid>/stat``, None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may contain spaces and ')': split after the last ')'.
    rest = raw[raw.rindex(")") + 2 :].split()
    return rest[0], int(rest[19])


def proc_start_time(pid: int) -> int | None:
    st = proc_stat(pid)
    return None if st is None else st[1]


def proc_cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def not_ours(pid: int, start_time: int, match: str) -> str | None:
    """None if ``pid`` is alive and is the recorded process, else the reason it is not."""
    st = proc_stat(pid)
    if st is None:
        return "exited"
    state, started = st
    if state in ("Z", "X"):
        return "exited (zombie)"
    if started != start_time:
        return f"PID reused (start time {started}, recorded {start_time})"
    if match and match not in proc_cmdline(pid):
        return f"command line lacks {match!r}"
    return None


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _wait_gone(pid: int, start_time: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        _reap(pid)
        if not_ours(pid, start_time, "") is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def stop_pid(pid: int, start_time: int, match: str, timeout: float = STOP_TIMEOUT) -> str:
    """SIGTERM (then SIGKILL) the recorded process; returns what happened.

    Raises :class:`OSError` if it survives SIGKILL.  Re-checks the identity right before
    each signal.
    """
    reason = not_ours(pid, start_time, match)
    if reason is not None:
        return reason
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, KILL_TIMEOUT)):
        if not_ours(pid, start_time, match) is not None:
            return f"stopped ({signal.Signals(sig).name} not needed)"
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return "exited"
        if _wait_gone(pid, start_time, wait):
            return f"stopped ({sig.name})"
    raise OSError(f"PID {pid} survived SIGKILL")


def stop_records(records: Iterable[Mapping[str, Any]], report: CleanReport) -> None:
    """Stop every recorded process (``pid``, ``start_time``, ``match``, ``name``); last first."""
    for rec in reversed(list(records)):
        try:
            pid, start = int(rec["pid"]), int(rec["start_time"])
        except (KeyError, TypeError, ValueError):
            report.errors.append(f"malformed process record {dict(rec)!r}")
            continue
        label = f"{rec.get('name', '?')} (pid {pid})"
        try:
            outcome = stop_pid(pid, start, str(rec.get("match", "")))
        except OSError as e:
            report.errors.append(f"{label}: {e}")
            continue
        if outcome.startswith("stopped"):
            report.stopped.append(f"{label} {outcome[len('stopped ') :]}")
        else:
            report.skipped.append(f"{label}: {outcome}")


# --- namespaces ------------------------------------------------------------------------


def lab_namespaces(prefix: str) -> list[str]:
    """Existing namespaces whose names a lab with ``prefix`` can have (exact pattern)."""
    pattern = netns_pattern(prefix)
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if pattern.match(n))


def _netns_id(name: str) -> tuple[int, int] | None:
    try:
        st = os.stat(NETNS_DIR / name)
    except FileNotFoundError:
        return None
    if st.st_ino == 0 or not st.st_dev:
        return None
    return st.st_dev, st.st_ino


def pids_in_namespaces(names: Iterable[str]) -> dict[int, str]:
    """PIDs (other than ours) whose network namespace is one of ``names``."""
    ids = {i: n for n in names if (i := _netns_id(n)) is not None}
    if not ids:
        return {}
    found: dict[int, str] = {}
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        ns = ids.get((st.st_dev, st.st_ino))
        if ns is not None:
            found[int(entry)] = ns
    return found


def stop_namespace_processes(names: Iterable[str], report: CleanReport) -> None:
    """Stop processes still inside the lab's namespaces (they can only be the lab's)."""
    names = list(names)
    for pid, ns in sorted(pids_in_namespaces(names).items()):
        start = proc_start_time(pid)
        if start is None:
            continue
        label = f"{proc_cmdline(pid)[:60] or '?'} (pid {pid}, in {ns})"
        try:
            outcome = stop_pid(pid, start, "")
        except OSError as e:
            report.errors.append(f"{label}: {e}")
            continue
        if outcome.startswith("stopped"):
            report.stopped.append(label)


def remove_namespace(name: str, prefix: str, report: CleanReport) -> None:
    if not netns_pattern(prefix).match(name):
        report.errors.append(f"refused to delete namespace {name!r}: not a {prefix!r} lab name")
        return
    if not (NETNS_DIR / name).exists():
        return
    from pyroute2 import netns

    try:
        netns.remove(name)
    except OSError as e:
        report.errors.append(f"namespace {name}: {e}")
        return
    report.namespaces.append(name)


# --- the whole lab ---------------------------------------------------------------------


def remove_lab(
    prefix: str,
    records: Iterable[Mapping[str, Any]],
    namespaces: Iterable[str] = (),
    report: CleanReport | None = None,
) -> CleanReport:
    """Stop ``records``, then every process left in the lab's namespaces, delete those
    namespaces (``namespaces`` plus any matching the prefix) and the state directory."""
    report = report if report is not None else CleanReport(prefix)
    stop_records(records, report)
    names = sorted(set(namespaces) | set(lab_namespaces(prefix)))
    pattern = netns_pattern(prefix)
    names = [n for n in names if pattern.match(n)]
    stop_namespace_processes(names, report)
    for name in names:
        remove_namespace(name, prefix, report)
    directory = state_dir(prefix)
    bpffs = directory / "bpf"
    if os.path.ismount(bpffs):  # the lab's BPF filesystem: unmounting frees its pins
        proc = subprocess.run(
            ["umount", "-l", str(bpffs)], check=False, capture_output=True, text=True
        )
        if proc.returncode != 0:
            report.errors.append(f"{bpffs}: umount: {proc.stderr.strip()}")
        else:
            report.paths.append(str(bpffs))
    if directory.exists():
        try:
            shutil.rmtree(directory)
        except OSError as e:
            report.errors.append(f"{directory}: {e}")
        else:
            report.paths.append(str(directory))
    return report


def recorded_processes(state: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Process records of a state object: the lab's own, then the agents'."""
    out: list[Mapping[str, Any]] = []
    for rec in state.get("processes") or []:
        if isinstance(rec, Mapping):
            out.append(rec)
    agents = state.get("agents")
    if isinstance(agents, Mapping):
        out += [r for r in agents.get("processes") or [] if isinstance(r, Mapping)]
    return out


def clean(prefix: str) -> CleanReport:
    """Remove every leftover of any lab with ``prefix``.  Safe to run any number of times."""
    report = CleanReport(prefix)
    records: list[Mapping[str, Any]] = []
    namespaces: list[str] = []
    path = state_file(prefix)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        data = None
    except (OSError, ValueError) as e:
        report.skipped.append(f"{path}: unreadable ({e}); cleaning by prefix only")
        data = None
    if isinstance(data, dict):
        records = recorded_processes(data)
        namespaces = [n for n in data.get("namespaces") or [] if isinstance(n, str)]
    return remove_lab(prefix, records, namespaces, report)
