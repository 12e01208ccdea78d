"""One line per event, journald-friendly: ``event=view-changed live=A,B epoch=3``.

Owns: the log line format (logfmt key=value, values quoted when needed), the syslog-style
level prefix journald understands (``<6>`` info, ``<4>`` warning, ``<3>`` error) when
stderr is the journal, and a tiny helper to emit events.  Must not: buffer or rotate.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

LEVELS = {"debug": 7, "info": 6, "notice": 5, "warning": 4, "error": 3}


def _value(v: Any) -> str:
    if isinstance(v, (list, tuple, set, frozenset)):
        v = ",".join(str(x) for x in (sorted(v) if isinstance(v, (set, frozenset)) else v))
    s = str(v)
    if s == "" or any(c in s for c in ' "=\t\n'):
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return s


def format_event(event: str, level: str = "info", **fields: Any) -> str:
    parts = [f"level={level}", f"event={event}"]
    parts += [f"{k}={_value(v)}" for k, v in fields.items() if v is not None]
    return " ".join(parts)


class EventLog:
    def __init__(self, stream: TextIO | None = None, node: str | None = None) -> None:
        self.stream = stream or sys.stderr
        self.node = node
        self.journal = bool(os.environ.get("JOURNAL_STREAM"))

    def __call__(self, event: str, level: str = "info", **fields: Any) -> None:
        if self.node is not None:
            fields = {"node": self.node, **fields}
        line = format_event(event, level, **fields)
        if self.journal:
            line = f"<{LEVELS.get(level, 6)}>{line}"
        else:
            now = time.time()
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now))
            line = f"{stamp}.{int(now % 1 * 1000):03d} {line}"
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass
