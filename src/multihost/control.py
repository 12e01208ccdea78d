"""Local control socket: newline-delimited JSON requests and replies over a Unix socket.

Owns: the wire format of control requests (``{"cmd": "status"}``, ``{"cmd": "set-live",
...}``, ``{"cmd": "drain"}``...), the asyncio server shell that dispatches them to a handler,
socket permissions (root-only: the socket is created mode 0600 in a 0700 directory), and the
blocking client used by the CLI and the lab.

Must not: know what the commands do; the agent supplies the handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

MAX_REQUEST = 64 * 1024

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlError(RuntimeError):
    """The agent could not be reached, or it answered with an error."""


async def serve(path: Path, handler: Handler) -> asyncio.AbstractServer:
    """Listen on ``path`` (replacing a stale socket) and answer one JSON line per request."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if path.is_socket():
            path.unlink()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                        raise ValueError("request must be an object with a string 'cmd'")
                    reply = await handler(req)
                except (ValueError, KeyError, TypeError) as e:
                    reply = {"ok": False, "error": str(e)}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    old = os.umask(0o077)
    try:
        server = await asyncio.start_unix_server(on_client, path=str(path), limit=MAX_REQUEST)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return server


def request(path: Path | str, cmd: str, timeout: float = 5.0, **args: Any) -> dict[str, Any]:
    """Send one request and return the reply; raises :class:`ControlError` on failure."""
    msg = json.dumps({"cmd": cmd, **args}).encode() + b"\n"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(msg)
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
    except FileNotFoundError:
        raise ControlError(f"no agent control socket at {path} (is the agent running?)") from None
    except OSError as e:
        raise ControlError(f"control socket {path}: {e.strerror or e}") from None
    try:
        reply: dict[str, Any] = json.loads(buf)
    except ValueError:
        raise ControlError(f"control socket {path}: unreadable reply {buf[:80]!r}") from None
    if not reply.get("ok", False):
        raise ControlError(str(reply.get("error", "request failed")))
    return reply
