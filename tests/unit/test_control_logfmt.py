"""Control socket round trip (a real Unix socket in tmp) and the log line format."""

from __future__ import annotations

import asyncio
import io
import stat
from pathlib import Path
from typing import Any

import pytest

from multihost.control import ControlError, request, serve
from multihost.logfmt import EventLog, format_event


def test_control_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "run" / "ctl.sock"

    async def handler(req: dict[str, Any]) -> dict[str, Any]:
        if req["cmd"] == "boom":
            raise ValueError("bad thing")
        return {"ok": True, "echo": req}

    async def main() -> list[Any]:
        server = await serve(path, handler)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        results: list[Any] = []
        results.append(await asyncio.to_thread(request, path, "status", x=1))
        try:
            await asyncio.to_thread(request, path, "boom")
        except ControlError as e:
            results.append(str(e))
        server.close()
        await server.wait_closed()
        return results

    ok, err = asyncio.run(main())
    assert ok == {"ok": True, "echo": {"cmd": "status", "x": 1}}
    assert err == "bad thing"


def test_control_no_agent(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="is the agent running"):
        request(tmp_path / "nope.sock", "status")


def test_format_event() -> None:
    line = format_event("view-changed", live=["A", "B"], reason="no heartbeat 400ms", x=None)
    assert line == 'level=info event=view-changed live=A,B reason="no heartbeat 400ms"'


def test_event_log_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:1")
    buf = io.StringIO()
    EventLog(buf, node="A")("rejected", level="warning", reason="bad-mac")
    assert buf.getvalue() == "<4>level=warning event=rejected node=A reason=bad-mac\n"
