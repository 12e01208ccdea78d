"""multihost: active-active multi-hosted IP addresses for Linux clusters.

This package owns the whole product; each sub-module opens with a docstring saying what it
owns and what it must not do.  Pure cores (assignment, flowhash, macaddr, config,
membership, dataplane.ruleset, dataplane.rulesettables, dataplane.rulesetdelta,
dataplane.arp) never touch sockets, clocks or subprocesses.
"""

__version__ = "0.1.0"
