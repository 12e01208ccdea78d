"""``python -m multihost``: the same as the ``multihost`` command."""

from multihost.cli import entry

entry()
