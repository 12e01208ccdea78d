"""The ``multihost`` command line: one module per subcommand, dispatched from here.

Owns: argument parsing, the exit-status convention (0 ok, 1 operation failed, 2 bad input:
one ``multihost: error: ...`` line on stderr; with ``--json`` also exactly one JSON object
``{"ok": false, "error": ..., "code": N}`` on stdout) and the registry of subcommands.
Must not: contain subcommand logic; each ``cli/<name>.py`` exposes ``register(subparsers)``
which adds its parser and sets ``func`` to a ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from multihost import __version__
from multihost.cli.common import (
    EXIT_FAILED,
    EXIT_USAGE,
    OperationError,
    Parser,
    UsageError,
    error_object,
    print_json,
)

#: Subcommand modules, in the order ``--help`` lists them.
SUBCOMMANDS: tuple[str, ...] = (
    "simulate",
    "whohas",
    "check-config",
    "agent",
    "status",
    "drain",
    "cleanup",
    "backend-routes",
    "lab",
    "completion",
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="multihost",
        description=(
            "Active-active multi-hosted IP addresses for Linux clusters: every member answers "
            "ARP for a traffic IP with a multicast MAC, and an nftables jhash filter keeps "
            "each member's exact share of the flows."
        ),
        epilog="Exit status: 0 success, 1 the operation failed, 2 invalid input.",
    )
    parser.add_argument("--version", action="version", version=f"multihost {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"multihost.cli.{name.replace('-', '_')}")
        module.register(sub)
    return parser


def wants_json(argv: Sequence[str]) -> bool:
    """Whether ``--json`` is among the options (not after a ``--``)."""
    args = list(argv)
    return "--json" in (args[: args.index("--")] if "--" in args else args)


def _fail(message: str, code: int, as_json: bool) -> int:
    if as_json:
        print_json(error_object(message, code))
    print(f"multihost: error: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        return _fail(str(e), EXIT_USAGE, wants_json(argv))
    as_json = bool(getattr(args, "json", False))
    try:
        rc: int = args.func(args)
    except UsageError as e:
        return _fail(str(e), EXIT_USAGE, as_json)
    except OperationError as e:
        return _fail(str(e), EXIT_FAILED, as_json)
    except OSError as e:  # e.g. a lab command without root: a message, not a traceback
        return _fail(str(e), EXIT_FAILED, as_json)
    except KeyboardInterrupt:
        print("multihost: interrupted", file=sys.stderr)
        return 130
    return rc


def entry() -> None:  # pragma: no cover - console script wrapper
    sys.exit(main())
