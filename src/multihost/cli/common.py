"""Helpers shared by subcommands: error types, JSON output, table rendering, the parser.

The error contract: a subcommand raises :class:`UsageError` (invalid input, exit 2) or
:class:`OperationError` (the operation failed, exit 1); ``cli.main`` prints one
``multihost: error: ...`` line on stderr and, when ``--json`` was given, exactly one JSON
object on stdout: :func:`error_object` (``{"ok": false, "error": "...", "code": N}``).

Must not: hold subcommand logic.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, NoReturn


class UsageError(Exception):
    """Invalid input: printed as one ``multihost: error: ...`` line, exit status 2."""


class OperationError(Exception):
    """The operation failed (no agent answers, a timeout, ...): exit status 1."""


EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def error_object(message: str, code: int, **extra: Any) -> dict[str, Any]:
    """The one JSON shape of an error: ``{"ok": false, "error": message, "code": code}``."""
    return {"ok": False, "error": message, "code": code, **extra}


class Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are :class:`UsageError` (one line, exit 2, JSON
    with ``--json``) instead of a usage dump and ``SystemExit``."""

    def error(self, message: str) -> NoReturn:
        prog = self.prog.removeprefix("multihost").strip()
        where = f"{prog}: " if prog else ""
        hint = f" (see 'multihost {prog} --help')" if prog else " (see 'multihost --help')"
        raise UsageError(f"{where}{message}{hint}")


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=None, separators=(", ", ": "))
    sys.stdout.write("\n")


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print exactly one JSON object instead of text"
    )


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


Formatter = argparse.RawDescriptionHelpFormatter
