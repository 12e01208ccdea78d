"""The ``multihost`` command line: one module per subcommand, dispatched from here.

Owns: argument parsing, the exit-status convention (0 ok, 1 operation failed, 2 bad input:
one ``multihost: error: ...`` line on stderr) and the registry of subcommands.
Must not: contain subcommand logic; each ``cli/<name>.py`` exposes ``register(subparsers)``
which adds its parser and sets ``func`` to a ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from multihost import __version__
from multihost.cli.common import UsageError

#: Subcommand modules, in the order ``--help`` lists them.
SUBCOMMANDS: tuple[str, ...] = (
    "simulate",
    "whohas",
    "check-config",
    "agent",
    "status",
    "drain",
    "cleanup",
    "lab",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc: int = args.func(args)
    except UsageError as e:
        print(f"multihost: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("multihost: interrupted", file=sys.stderr)
        return 130
    return rc


def entry() -> None:  # pragma: no cover - console script wrapper
    sys.exit(main())
