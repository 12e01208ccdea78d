"""The lab's naming scheme: its prefix, its namespaces' names, where its state lives.

Owns: the prefix (``$MULTIHOST_LAB_PREFIX`` or ``mh-``, and what a usable one looks like),
the namespace names (every namespace is ``<prefix><role>``: ``<prefix>sw`` for the switch,
``<prefix>A``... for nodes, ``<prefix>c1``... for clients, and in transparent or routed labs
``<prefix>bsw``, ``<prefix>b1``... and ``<prefix>rt``; :func:`netns_pattern` is the exact
pattern the cleaner matches), the limits they imply (:data:`MAX_NODES`, :data:`MAX_CLIENTS`),
the state directory ``/run/multihost-lab/<prefix>/``, and :class:`TopologyError`, which every
pure lab description raises.

Must not: create, read or delete anything (no sockets, files, processes or netlink);
:mod:`multihost.lab.topology` describes whole labs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

#: Parent of every lab's state directory (``/run/multihost-lab/<prefix>/``).
RUN_DIR = Path("/run/multihost-lab")
#: Namespaces live here (iproute2's convention, also pyroute2's).
NETNS_DIR = Path("/run/netns")
DEFAULT_PREFIX = "mh-"
PREFIX_ENV = "MULTIHOST_LAB_PREFIX"
MAX_NODES = 16  # node slots 0..15 (heartbeat version 2)
MAX_CLIENTS = 8
NODE_NAMES = "ABCDEFGHIJKLMNOP"

_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.]{0,18}-$")


class TopologyError(ValueError):
    """A lab description that cannot be built (the message names the offending value)."""


def default_prefix() -> str:
    """``$MULTIHOST_LAB_PREFIX`` if set, else ``mh-``."""
    return os.environ.get(PREFIX_ENV) or DEFAULT_PREFIX


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if usable: 2-20 of ``[A-Za-z0-9_.]`` ending in ``-``."""
    if not _PREFIX_RE.match(prefix):
        raise TopologyError(
            f"lab prefix {prefix!r} must be 2-20 characters of letters, digits, '_' or '.', "
            "ending in '-' (e.g. 'mh-')"
        )
    return prefix


def netns_pattern(prefix: str) -> re.Pattern[str]:
    """Exactly the namespace names a lab with ``prefix`` can create (and nothing longer)."""
    names = r"(?:sw|bsw|rt|[A-P]|c[1-8]|b[1-8])"
    return re.compile(rf"^{re.escape(validate_prefix(prefix))}{names}$")


def state_dir(prefix: str) -> Path:
    return RUN_DIR / validate_prefix(prefix)


def state_file(prefix: str) -> Path:
    return state_dir(prefix) / "state.json"
