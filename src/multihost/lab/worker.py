"""A JSON-lines worker process inside a lab namespace (the probe-side half of a measurement).

Owns: starting ``python -m <module>`` under ``ip netns exec`` with this source tree on the
path, the line protocol (one JSON object per line each way; the first reply is
``{"event": "ready", ...}``, the last ``{"event": "done", ...}``), timed reads, the
stderr tail for error messages, and killing and reaping the process.  Must not: know what
the worker measures (subclasses do).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import multihost
from multihost.lab.state import LabError


class NetnsWorker:
    """Subclasses set ``module``, ``what`` (for errors) and ``stderr_tail``."""

    module = ""
    what = "worker"
    stderr_tail = 300

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self.proc: subprocess.Popen[str] | None = None

    def start(self, req: dict[str, Any], ready_timeout: float) -> dict[str, Any]:
        """Start the worker, send ``req``, return its ``ready`` message."""
        env = dict(os.environ)
        src = str(Path(multihost.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, sys.executable, "-m", self.module],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self._send(req)
        line = self._readline(ready_timeout)
        ready: dict[str, Any] = json.loads(line) if line else {}
        if ready.get("event") != "ready":
            err = self._stderr()
            self.close()
            raise LabError(f"{self.what} did not start: {line!r} {err}")
        return ready

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, obj: dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def _readline(self, timeout: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline() if ready else ""

    def _until_done(self, timeout: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The worker's JSON lines up to its ``{"event": "done", ...}`` line, and that line;
        the process is reaped."""
        assert self.proc is not None
        objs: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while True:
            line = self._readline(max(0.0, deadline - time.monotonic()))
            if not line:
                raise LabError(f"{self.what} gave no result in time {self._stderr()}")
            obj = json.loads(line)
            if obj.get("event") == "done":
                self.proc.wait(timeout=5)
                return objs, obj
            objs.append(obj)

    def _stderr(self) -> str:
        p = self.proc
        if p is None or p.stderr is None or p.poll() is None:
            return ""
        return p.stderr.read()[-self.stderr_tail :]

    def close(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()
        self.proc = None
